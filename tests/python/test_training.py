"""Training sharded models: data parallel on top of tensor parallel on a 2-D mesh, and
torch.compile over tensor-parallel and split models, against the unsharded model."""
import copy

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import torch_mp
from distributed import run_ranks
from models import GPT


def dense_gpt_and_batch():
    torch.manual_seed(0)
    return GPT(vocab=97, dim=32, heads=4, depth=2), torch.randint(0, 97, (4, 8))


def assert_trains_like_dense(model, sharded, dense, ids, dp_rank):
    """Two SGD steps: the dense model on the global batch, the data-parallel replicas on halves of it;
    then the gathered stock state_dict equals the dense one."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (dense, model)]
    for step in range(2):
        for m, optimizer, batch in ((dense, optimizers[0], ids), (model, optimizers[1], ids.chunk(2)[dp_rank])):
            optimizer.zero_grad()
            _, loss = m(batch, targets=batch)
            loss.backward()
            optimizer.step()
    gathered = torch_mp.full_state_dict(sharded)
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(gathered[key], value, rtol=1e-4, atol=1e-5, msg=key)


def check_dp_by_tp(rank, world):
    mesh = torch_mp.init_mesh(dp=2, tp=2)
    dense, ids = dense_gpt_and_batch()
    sharded = torch_mp.tensor_parallel(copy.deepcopy(dense), group=mesh["tp"])
    # DDP on the DTensor parameters: a clear error when it is built (it was DTensor's
    # NotImplementedError for c10d.broadcast_). (A model with plain buffers fails before, in
    # DTensor's "got mixed torch.Tensor and DTensor" for the cat of DDP's broadcast bucket.)
    with pytest.raises(ValueError, match=r"c10d.broadcast_ of DTensors .* expected DDP built inside "
                                         r"torch_mp.local_parameters\(model\)"):
        DistributedDataParallel(sharded, process_group=mesh["dp"].get_group())
    with torch_mp.local_parameters(sharded):  # DDP needs plain tensors
        model = DistributedDataParallel(sharded, process_group=mesh["dp"].get_group())
    assert_trains_like_dense(model, sharded, dense, ids, mesh["dp"].get_local_rank())


def check_fsdp_by_tp(rank, world):
    from torch.distributed.fsdp import fully_shard

    mesh = torch_mp.init_mesh(dp=2, tp=2)
    dense, ids = dense_gpt_and_batch()
    model = torch_mp.tensor_parallel(copy.deepcopy(dense), group=mesh["tp"])
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    assert_trains_like_dense(model, model, dense, ids, mesh["dp"].get_local_rank())


def test_dp_by_tp_matches_dense():
    run_ranks(4, check_dp_by_tp)


def test_fsdp2_by_tp_matches_dense():
    run_ranks(4, check_fsdp_by_tp)


def check_bad_mesh(rank, world):
    with pytest.raises(ValueError, match=r"dp=3 x tp=1 = 3 ranks but the world has 2"):
        torch_mp.init_mesh(dp=3, tp=1)


def test_bad_mesh_is_a_clear_error():
    run_ranks(2, check_bad_mesh)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        torch_mp.init_mesh(dp=1)


def compile_checks(model, eager, ids, step_inputs):
    """Compiled (inductor, fullgraph) against eager: zero graph breaks, the same losses and steps, no
    recompilation after the first step, dynamic sizes, inference mode and compiled autograd."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x: model(x, targets=x))(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    for step in range(3):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            _, loss = compiled(ids, targets=ids)
        _, expected = eager(ids, targets=ids)
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5, msg=f"loss at step {step}")
        for value, optimizer in ((loss, optimizers[0]), (expected, optimizers[1])):
            value.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)

    # Dynamic batch and sequence sizes: marked once, no recompilation for new sizes.
    torch._dynamo.reset()
    dynamic = torch.compile(model, fullgraph=True)
    first = step_inputs[0].clone()
    torch._dynamo.mark_dynamic(first, 0)
    torch._dynamo.mark_dynamic(first, 1)
    dynamic(first)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for other in step_inputs[1:]:
            torch.testing.assert_close(dynamic(other), eager(other), rtol=1e-4, atol=1e-5)

    with torch.inference_mode():
        torch.testing.assert_close(compiled(ids), eager(ids), rtol=1e-4, atol=1e-5)

    # Compiled autograd traces the C++ autograd formulas into the backward graph.
    model.zero_grad()
    eager.zero_grad()
    from torch._dynamo import compiled_autograd

    # Inductor, not aot_eager: the column-parallel backward starts its all-reduce in place and waits
    # after the weight-gradient matmul, which only a reinplacing backend keeps (aot_eager refuses it).
    with compiled_autograd._enable(torch.compile(fullgraph=True)):
        compiled(ids, targets=ids)[1].backward()
    eager(ids, targets=ids)[1].backward()
    for (name, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=f"compiled autograd {name}")


def gpt_and_inputs():
    torch.manual_seed(0)
    dense = GPT(vocab=97, dim=32, heads=4, depth=2)
    ids = torch.randint(0, 97, (2, 8))
    sizes = [torch.randint(0, 97, shape) for shape in ((2, 8), (3, 5), (5, 12))]
    return dense, ids, sizes


def check_compiled_tensor_parallel(rank, world):
    dense, ids, sizes = gpt_and_inputs()
    compile_checks(torch_mp.tensor_parallel(copy.deepcopy(dense)), torch_mp.tensor_parallel(copy.deepcopy(dense)),
                   ids, sizes)


def test_compiled_tensor_parallel_training():
    run_ranks(2, check_compiled_tensor_parallel, timeout=600)


@pytest.mark.full  # compiled split: test_pipeline_compile.py in make test; this whole check in make test-full
def test_compiled_split_training():
    dense, ids, sizes = gpt_and_inputs()
    compile_checks(torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"]),
                   torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"]), ids, sizes)


@pytest.mark.full  # torchrun examples: test_tensor_parallel.py in make test; compiled too in make test-full
def test_train_compile_example_under_torchrun(tmp_path):
    import os
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    checkpoint = str(tmp_path / "gpt2.safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         os.path.join(root, "examples", "python", "train_compile.py"), "--tp", "2", "--compile", "--steps", "3",
         "--layers", "2", "--hidden", "64", "--seq", "32", "--save", checkpoint],
        capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens/s" in result.stdout and "tensor parallel over 2 ranks" in result.stdout, result.stdout
    config = transformers.GPT2Config(vocab_size=512, n_positions=32, n_embd=64, n_layer=2, n_head=8, use_cache=False)
    transformers.GPT2LMHeadModel(config).load_state_dict(load_file(checkpoint), strict=True)
