"""What the tests compare with: leaves of the same values for the dense and the parallel model, and
closeness within a tolerance (fp32 defaults; whole models pass looser ones)."""
import torch

RTOL, ATOL = 1e-5, 1e-6


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    """A leaf copy of ``tensor`` that requires grad: one per model, so each gets its own ``.grad``."""
    return tensor.detach().clone().requires_grad_()


def close(actual, expected, msg: str = "", rtol: float = RTOL, atol: float = ATOL) -> None:
    """``actual`` within tolerance of ``expected``. A DTensor ``actual`` (a tensor-parallel
    parameter or gradient) against a plain ``expected`` compares its local shard when ``expected``
    has that shape (the tests' expected shards), else its full tensor (a collective)."""
    from torch.distributed.tensor import DTensor

    if isinstance(actual, DTensor) and not isinstance(expected, DTensor):
        actual = actual.to_local() if actual.to_local().shape == expected.shape else actual.full_tensor()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)


def gathered_gradients(model, dense):
    """A parallel model's gradients gathered as the dense model's state_dict (``full_state_dict``
    of the gradients copied into the weights), then the dense weights loaded back, sharded as
    before (the gradients stay in ``.grad``). A collective: every rank calls it."""
    import torch_mp

    with torch.no_grad():
        for param in [p for p in model.parameters() if not p.is_meta]:
            param.copy_(param.grad)
    gathered = torch_mp.full_state_dict(model)
    torch_mp.load_full_state_dict(model, dense.state_dict())
    return gathered


def expect_dense_step(model, dense, rows, ids, loss_fn):
    """One ``model.train_step`` on this replica's ``rows`` against the dense model's forward and
    backward on the whole batch ``ids``: the same loss, and every gradient, gathered as the dense
    model's state_dict (``gathered_gradients``: this rank's stages' shards hold theirs). Returns the
    parallel model's loss. A collective: every rank calls it."""
    loss = model.train_step(input_ids=rows, target=rows, loss_fn=loss_fn)
    expected = loss_fn(dense(input_ids=ids), ids)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    expect_dense_gradients(model, dense)
    return loss


def expect_dense_gradients(model, dense, where: str = "") -> None:
    """Every gradient of a parallel model, gathered as the dense model's state_dict
    (``gathered_gradients``), against the dense model's ``.grad``. A collective."""
    gathered = gathered_gradients(model, dense)
    for name, param in dense.named_parameters():
        torch.testing.assert_close(gathered[name], param.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{where}{name}: {m}")


def expect_dense_weights(model, dense) -> None:
    """A parallel model's weights, gathered (``torch_mp.full_state_dict``), against the dense
    model's state_dict. A collective."""
    import torch_mp

    stepped = torch_mp.full_state_dict(model)
    for name, value in dense.state_dict().items():
        torch.testing.assert_close(stepped[name], value, rtol=1e-4, atol=1e-6)
