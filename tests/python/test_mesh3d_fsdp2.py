"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with a pipeline on a pp 2 x dp 2 mesh of 4 Gloo
ranks, tiny transformers Llama with random weights.

``pipeline(..., data_parallel=mesh["dp"], fully_shard=...)`` shards each layer of a rank's stages
over its replicas (torchtitan's composition): the dense loss, every gradient through
``full_state_dict``, ``clip_grad_norm_``, AdamW steps, and 1/(pp * dp) of the layers' parameters and
Adam state per rank. ``fully_shard`` applied by the user, before or after ``pipeline``: a clear
error before anything runs. Before that check, ``fully_shard`` on the model failed in the forward
("aten.embedding.default got mixed torch.Tensor and DTensor"), and on this rank's layers only it gave
the dense loss, then moved the sharded layers to the meta device after the step (their gradients
lost, the optimizer stepping nothing there)."""
import pytest
import torch
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

import torch_mp
from distributed import run_ranks
from tensors import expect_dense_step, expect_dense_weights
from test_mesh3d import adamw, batch, llama, loss_fn

pytest.importorskip("transformers")

REFUSED = r"sharded by torch.distributed.fsdp.fully_shard, which does not compose with a pipeline .*expected " \
          r"pipeline\(model, group=mesh\['pp'\], data_parallel=mesh\['dp'\]\) on a model fully_shard has not touched"


def own_layers(model):
    return [layer for layer in model.model.layers if not layer.self_attn.q_proj.weight.is_meta]


def check_fully_shard_with_a_pipeline_is_refused(rank, world):
    mesh = torch_mp.init_mesh(pp=2, dp=2, tp=1)
    replica = mesh["dp"].get_local_rank()
    ids = batch(8)[4 * replica:4 * (replica + 1)]

    # fully_shard, then pipeline: refused by pipeline, naming the module, before any collective.
    model = llama()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    with pytest.raises(ValueError, match=r"^pipeline: the root module, 'model.layers.0', "
                                         r"'model.layers.1', 'model.layers.2' and 1 more were " + REFUSED):
        torch_mp.pipeline(model, group=mesh["pp"], data_parallel=mesh["dp"], chunks=2)

    # pipeline, then fully_shard on this rank's layers (torchtitan's per-block wrapping): train_step
    # and the forward refuse on every rank; the weights the rank holds stay where they were.
    model = torch_mp.pipeline(llama(), group=mesh["pp"], data_parallel=mesh["dp"], chunks=2)
    for layer in own_layers(model):
        fully_shard(layer, mesh=mesh["dp"])
    with pytest.raises(ValueError, match=r"^pipeline: train_step: 'model.layers.\d', 'model.layers.\d' were "
                                         + REFUSED):
        model.train_step(input_ids=ids, target=ids, loss_fn=loss_fn)
    with pytest.raises(ValueError, match=r"^pipeline: forward: 'model.layers.\d'"):
        model(input_ids=ids)
    assert own_layers(model) and all(not param.is_meta for layer in own_layers(model) for param in layer.parameters())
    assert model.model.embed_tokens.weight.device.type == "cpu"  # the first call's placement never ran

    # fully_shard on the whole model (the other ranks' stand-ins too) on one rank of each pipeline
    # (ranks 0 and 1, pipeline index 0 of {0, 2} and {1, 3}): those name the module, their peers the
    # rank; none runs the schedule.
    model = torch_mp.pipeline(llama(), group=mesh["pp"], data_parallel=mesh["dp"], chunks=2)
    if rank < 2:
        fully_shard(model, mesh=mesh["dp"])
    message = r"^pipeline: train_step: the root module was " + REFUSED if rank < 2 else \
        r"^pipeline: rank\(s\) \[0\] hold modules sharded by torch.distributed.fsdp.fully_shard"
    with pytest.raises(ValueError, match=message):
        model.train_step(input_ids=ids, target=ids, loss_fn=loss_fn)

    # pipeline(..., fully_shard=) options it does not run with: before any collective.
    for kwargs, error, message in [
            (dict(fully_shard="yes"), TypeError, r"fully_shard = 'yes'; expected True, False or a dict"),
            (dict(fully_shard={"mesh": mesh["dp"]}), ValueError, r"fully_shard holds 'mesh'; expected the mesh as "
                                                                 r"data_parallel=mesh\['dp'\]"),
            (dict(fully_shard=True, data_parallel=mesh["dp"].get_group()), ValueError,
             r"fully_shard = True with data_parallel a ProcessGroup; expected data_parallel a 1-D DeviceMesh"),
            (dict(fully_shard=True, schedule="zbv"), ValueError, r"fully_shard with schedule = 'zbv'.*expected schedule "
                                                                 r"'gpipe', '1f1b' or 'interleaved_1f1b'"),
            (dict(fully_shard=True, checkpoint="always"), ValueError, r"fully_shard with checkpoint = 'always'"),
            (dict(fully_shard=True, schedule="interleaved_1f1b", chunks=4), ValueError,
             r"fully_shard with schedule = 'interleaved_1f1b' and chunks = 4 > 2 pipeline ranks, not supported yet")]:
        options = dict(group=mesh["pp"], data_parallel=mesh["dp"], chunks=2)
        options.update(kwargs)
        with pytest.raises(error, match=r"^pipeline: " + message):
            torch_mp.pipeline(llama(), **options)
    with torch_mp.init_empty_weights():
        empty = llama()
    with pytest.raises(ValueError, match=r"^pipeline: fully_shard = True on a LlamaForCausalLM whose parameters are "
                                         r"on the meta device \(torch_mp.init_empty_weights\(\)\), not supported yet"):
        torch_mp.pipeline(empty, group=mesh["pp"], data_parallel=mesh["dp"], chunks=2, fully_shard=True)

    # An optimizer built before pipeline(..., fully_shard=True) holds the parameters FSDP2 replaced by
    # its shards: its step raises (it stepped nothing the model reads: wrong numbers from step 2 on).
    model = llama()
    early = torch.optim.AdamW(model.parameters())
    model = torch_mp.pipeline(model, group=mesh["pp"], data_parallel=mesh["dp"], chunks=2, fully_shard=True)
    model.train_step(input_ids=ids, target=ids, loss_fn=loss_fn)
    with pytest.raises(ValueError, match=r"AdamW.step: the optimizer holds a parameter of shape .* that "
                       r"pipeline\(..., fully_shard=True\) replaced by its DTensor shard .*expected an optimizer "
                       r"built after pipeline\(..., fully_shard=True\)"):
        early.step()

    # The recipe the errors name gives the dense numbers (the replicas' batches concatenated).
    dense = llama()
    model = torch_mp.pipeline(llama(), group=mesh["pp"], data_parallel=mesh["dp"], chunks=2)
    loss = model.train_step(input_ids=ids, target=ids, loss_fn=loss_fn)
    torch.testing.assert_close(loss, loss_fn(dense(input_ids=batch(8)), batch(8)).detach(), rtol=1e-5, atol=1e-6)


def test_fully_shard_with_a_pipeline_is_a_clear_error():
    run_ranks(4, check_fully_shard_with_a_pipeline_is_refused, timeout=300)


def local_elements(tensors):
    return sum(t.to_local().numel() if isinstance(t, DTensor) else t.numel() for t in tensors if not t.is_meta)


def train_like_dense(model, dense, replica, steps=2):
    """``steps`` AdamW steps, each a ``train_step`` on this replica's 4 rows of an 8-row batch
    against the dense model's on the whole batch: the loss and every gradient
    (``expect_dense_step``), the clipped norm (the clip changing the step), the stepped weights.
    Returns the parallel model's optimizer."""
    optimizer, dense_optimizer = adamw(model, eps=1e-4), adamw(dense, eps=1e-4)
    for step in range(steps):
        ids = batch(8, seed=step)
        expect_dense_step(model, dense, ids[4 * replica:4 * (replica + 1)], ids, loss_fn)
        norm = torch_mp.clip_grad_norm_(model, max_norm=0.5)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(dense.parameters(), max_norm=0.5),
                                   rtol=1e-5, atol=1e-6)
        assert norm > 0.5
        optimizer.step()
        dense_optimizer.step()
        optimizer.zero_grad()
        dense_optimizer.zero_grad()
        expect_dense_weights(model, dense)
    return optimizer


def check_fully_shard_matches_dense(rank, world, schedule, reshard_after_forward, tied):
    mesh = torch_mp.init_mesh(pp=2, dp=2, tp=1)
    replica = mesh["dp"].get_local_rank()
    dense = llama(tied=tied)
    model = torch_mp.pipeline(llama(tied=tied), group=mesh["pp"], data_parallel=mesh["dp"], chunks=2,
                              schedule=schedule, fully_shard={"reshard_after_forward": reshard_after_forward})
    # This rank's stages' layers are FSDP2's, sharded over the replicas; the other ranks' stay meta
    # stand-ins, untouched.
    mine = own_layers(model)
    assert len(mine) == 2 and all(isinstance(layer, FSDPModule) for layer in mine)
    assert all(isinstance(param, DTensor) for layer in mine for param in layer.parameters())
    others = [layer for layer in model.model.layers if layer not in mine]
    assert all(not isinstance(layer, FSDPModule) and all(p.is_meta for p in layer.parameters()) for layer in others)
    # So are the ends of this rank's stages (not tied ones), the others' meta from the start.
    first = mesh["pp"].get_local_rank() == 0
    ends = [(model.model.embed_tokens, first, tied), (model.model.norm, not first, False),
            (model.lm_head, not first, tied)]
    for end, held, whole in ends:
        assert isinstance(end, FSDPModule) == (held and not whole)
        assert all(p.is_meta for p in end.parameters()) == (not held and not whole)

    optimizer = train_like_dense(model, dense, replica)  # the second step after the first placed the ends

    # The forward alone, on every rank; the layers resharded after it, whatever reshard_after_forward.
    ids = batch(4, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-6)

    # Held per rank: a quarter of the layers' parameters and Adam state (1/(pp * dp)); of the embedding
    # (first stage) and the final norm and head (last stage) too, unless tied (then whole on both).
    layers = local_elements(p for layer in model.model.layers for p in layer.parameters())
    assert layers * 4 == sum(p.numel() for layer in dense.model.layers for p in layer.parameters()), (rank, layers)
    held, ideal = local_elements(model.parameters()), sum(p.numel() for p in dense.parameters()) / 4
    state = [t for p in model.parameters() if not p.is_meta for t in optimizer.state[p].values() if t.dim()]
    assert local_elements(state) == 2 * held
    assert held <= (1.002 if not tied else 1.16) * ideal, (held, ideal)


@pytest.mark.parametrize("schedule,reshard_after_forward,tied", [("1f1b", True, False),
                                                                 ("interleaved_1f1b", False, True)])
def test_fully_shard_over_a_pipeline_matches_dense_pp2_dp2(schedule, reshard_after_forward, tied):
    run_ranks(4, check_fully_shard_matches_dense, schedule, reshard_after_forward, tied, timeout=400)


def check_fully_shard_over_tensor_parallel_matches_dense(rank, world, folder):
    """pp 2 x dp 2 x tp 2: tensor_parallel on mesh["tp"], then the pipeline with fully_shard over
    mesh["dp"] (torch's 2-D composition, torchtitan's order): the layers' parameters 2-D DTensors
    on (dp, tp); the dense loss, gradients, clipped norm, AdamW steps and logits; torch_mp.save
    (each tensor-parallel shard gathered over the replicas) resumes bit-identical and loads into
    the plain model."""
    mesh = torch_mp.init_mesh(pp=2, dp=2, tp=2)
    replica = mesh["dp"].get_local_rank()
    dense = llama()

    def sharded(seed):
        return torch_mp.pipeline(torch_mp.tensor_parallel(llama(seed), group=mesh["tp"]), group=mesh["pp"],
                                 data_parallel=mesh["dp"], chunks=2, fully_shard=True)

    model = sharded(0)
    mine = own_layers(model)
    assert len(mine) == 2 and all(isinstance(layer, FSDPModule) for layer in mine)
    assert all(isinstance(p, DTensor) and p.device_mesh.mesh_dim_names == ("dp", "tp")
               for layer in mine for p in layer.parameters())
    optimizer = train_like_dense(model, dense, replica)
    ids = batch(4, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    # Each rank holds an eighth of the layers' parameters (the norms, whole across tp, a quarter).
    layers = local_elements(p for layer in model.model.layers for p in layer.parameters())
    dense_layers = sum(p.numel() for layer in dense.model.layers for p in layer.parameters())
    assert layers * 8 <= 1.05 * dense_layers, (layers, dense_layers)

    # Saved after 2 steps: a fresh model at the same layout resumes bit-identical; the plain model
    # loads the dense run's weights.
    saved = torch_mp.full_state_dict(model)
    torch_mp.save(model, folder, optimizer=optimizer)
    resumed = sharded(5)
    resumed_optimizer = adamw(resumed, eps=1e-4)
    torch_mp.load(resumed, folder, optimizer=resumed_optimizer)
    ids = batch(8, seed=2)
    losses = []
    for each, each_optimizer in ((model, optimizer), (resumed, resumed_optimizer)):
        losses.append(each.train_step(input_ids=ids[4 * replica:4 * (replica + 1)], target=ids[4 * replica:4 * (replica + 1)],
                                      loss_fn=loss_fn))
        each_optimizer.step()
    assert torch.equal(losses[0], losses[1])
    after = [torch_mp.full_state_dict(each) for each in (model, resumed)]
    assert all(torch.equal(after[0][key], after[1][key]) for key in after[0])
    plain = llama(seed=6)
    torch_mp.load(plain, folder, optimizer=adamw(plain))
    for name, value in dense.state_dict().items():
        assert torch.equal(plain.state_dict()[name], saved[name]), name
        torch.testing.assert_close(plain.state_dict()[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.mesh3d_full  # 8 ranks
def test_fully_shard_over_tensor_parallel_matches_dense_pp2_dp2_tp2(tmp_path):
    """Before, pipeline(tensor_parallel(model), ..., fully_shard=True) was a ValueError ('fully_shard
    over torch_mp.tensor_parallel, not supported yet'), and torch_mp.save of FSDP2 over
    tensor_parallel a TypeError."""
    run_ranks(8, check_fully_shard_over_tensor_parallel_matches_dense, str(tmp_path / "checkpoint"), timeout=900)
