"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with a pipeline on a pp 2 x dp 2 mesh of 4 Gloo
ranks, tiny transformers Llama with random weights: a clear error before anything runs, never other
numbers than the dense model's. Before the check, ``fully_shard`` on the model failed in the forward
("aten.embedding.default got mixed torch.Tensor and DTensor"), and on this rank's layers only it gave
the dense loss, then moved the sharded layers to the meta device after the step (their gradients
lost, the optimizer stepping nothing there)."""
import pytest
import torch
from torch.distributed.fsdp import fully_shard

import torch_mp
from distributed import run_ranks
from test_mesh3d import batch, llama, loss_fn

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

    # The recipe the errors name gives the dense numbers (the replicas' batches concatenated).
    dense = llama()
    model = torch_mp.pipeline(llama(), group=mesh["pp"], data_parallel=mesh["dp"], chunks=2)
    loss = model.train_step(input_ids=ids, target=ids, loss_fn=loss_fn)
    torch.testing.assert_close(loss, loss_fn(dense(input_ids=batch(8)), batch(8)).detach(), rtol=1e-5, atol=1e-6)


def test_fully_shard_with_a_pipeline_is_a_clear_error():
    run_ranks(4, check_fully_shard_with_a_pipeline_is_refused, timeout=300)
