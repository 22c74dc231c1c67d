"""Tensor-parallel ops and layers on 2, 3 and 4 Gloo ranks against the dense computation."""
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks
from tensors import close, leaf
from torch_mp.nn import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy

def shard(tensor, dim, rank, world):
    return tensor.chunk(world, dim)[rank]


# --- the conjugate pairs ------------------------------------------------------------------------

def check_conjugate_ops(rank, world):
    full = torch.randn(world * 2, 3, world * 4)
    weights = [torch.randn(world * 2, 3, world * 4) for _ in range(world)]  # one per rank, known to all
    mine = weights[rank]

    # copy_to_tp: identity; backward all-reduces the per-rank gradients.
    x = leaf(full)
    y = torch_mp.copy_to_tp(x)
    close(y, full)
    (y * mine).sum().backward()
    close(x.grad, sum(weights), "copy_to_tp backward")

    # reduce_from_tp: sums the per-rank inputs; backward is the identity.
    x = leaf(full * (rank + 1))
    y = torch_mp.reduce_from_tp(x)
    close(y, full * sum(range(1, world + 1)))
    (y * mine).sum().backward()
    close(x.grad, mine, "reduce_from_tp backward")

    for dim in (0, -1):
        # gather_from_tp: rank blocks concatenated; backward keeps this rank's block.
        x = leaf(shard(full, dim, rank, world))
        y = torch_mp.gather_from_tp(x, dim)
        close(y, full)
        (y * mine).sum().backward()
        close(x.grad, shard(mine, dim, rank, world), f"gather_from_tp backward dim={dim}")

        # scatter_to_tp: this rank's block; backward all-gathers the blocks' gradients.
        x = leaf(full)
        y = torch_mp.scatter_to_tp(x, dim)
        close(y, shard(full, dim, rank, world))
        (y * shard(weights[rank], dim, rank, world)).sum().backward()
        expected = torch.cat([shard(weights[r], dim, r, world) for r in range(world)], dim)
        close(x.grad, expected, f"scatter_to_tp backward dim={dim}")

        # reduce_scatter_to_sp: this rank's block of the sum; backward all-gathers.
        x = leaf(full * (rank + 1))
        y = torch_mp.reduce_scatter_to_sp(x, dim)
        close(y, shard(full * sum(range(1, world + 1)), dim, rank, world))
        (y * shard(weights[rank], dim, rank, world)).sum().backward()
        close(x.grad, expected, f"reduce_scatter_to_sp backward dim={dim}")

        # gather_from_sp: blocks concatenated; backward reduce-scatters the per-rank gradients.
        x = leaf(shard(full, dim, rank, world))
        y = torch_mp.gather_from_sp(x, dim)
        close(y, full)
        (y * mine).sum().backward()
        close(x.grad, shard(sum(weights), dim, rank, world), f"gather_from_sp backward dim={dim}")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_conjugate_ops_match_dense(world):
    run_ranks(world, check_conjugate_ops)


# --- layers --------------------------------------------------------------------------------------

def dense_and_sharded_grads(dense_module, sharded_module, inputs, sharded_inputs=None):
    dense_inputs = [leaf(t) if t.is_floating_point() else t for t in inputs]
    sharded_inputs = [leaf(t) if t.is_floating_point() else t for t in (sharded_inputs or inputs)]
    dense_out = dense_module(*dense_inputs)
    sharded_out = sharded_module(*sharded_inputs)
    return dense_out, sharded_out, dense_inputs, sharded_inputs


def local(tensor):
    """This rank's shard of a DTensor parameter or gradient (the layers' parameters are DTensors)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_linear_layers(rank, world):
    x = torch.randn(5, 7, world * 4)
    for bias in (True, False):
        for gather_output in (False, True):
            dense = nn.Linear(world * 4, world * 6, bias=bias)
            layer = ColumnParallelLinear.from_dense(dense, gather_output=gather_output)
            assert local(layer.weight).shape == (6, world * 4)
            xd, xs = leaf(x), leaf(x)
            yd, ys = dense(xd), layer(xs)
            expected = yd if gather_output else shard(yd, -1, rank, world)
            close(ys, expected, "column forward")
            grad = torch.randn_like(yd)
            yd.backward(grad)
            ys.backward(grad if gather_output else shard(grad, -1, rank, world))
            close(xs.grad, xd.grad, "column input grad")
            close(local(layer.weight.grad), shard(dense.weight.grad, 0, rank, world), "column weight grad")
            if bias:
                close(local(layer.bias.grad), shard(dense.bias.grad, 0, rank, world), "column bias grad")

        for input_is_parallel in (True, False):
            dense = nn.Linear(world * 4, 9, bias=bias)
            layer = RowParallelLinear.from_dense(dense, input_is_parallel=input_is_parallel)
            xd = leaf(x)
            xs = leaf(shard(x, -1, rank, world) if input_is_parallel else x)
            yd, ys = dense(xd), layer(xs)
            close(ys, yd, "row forward")
            grad = torch.randn_like(yd)
            yd.backward(grad)
            ys.backward(grad)
            close(xs.grad, shard(xd.grad, -1, rank, world) if input_is_parallel else xd.grad, "row input grad")
            close(local(layer.weight.grad), shard(dense.weight.grad, 1, rank, world), "row weight grad")
            if bias:
                close(local(layer.bias.grad), dense.bias.grad, "row bias grad: added once")


def check_embedding_and_cross_entropy(rank, world):
    vocab = world * 5
    dense = nn.Embedding(vocab, 8)
    layer = VocabParallelEmbedding.from_dense(dense)
    ids = torch.randint(0, vocab, (4, 6))
    yd, ys = dense(ids), layer(ids)
    close(ys, yd, "embedding forward")
    grad = torch.randn_like(yd)
    yd.backward(grad)
    ys.backward(grad)
    close(local(layer.weight.grad), shard(dense.weight.grad, 0, rank, world), "embedding weight grad")

    logits = torch.randn(4, 6, vocab)
    target = torch.randint(0, vocab, (4, 6))
    target[0, :2] = -100
    for reduction in ("mean", "sum", "none"):
        ld, ls = leaf(logits), leaf(shard(logits, -1, rank, world))
        expected = F.cross_entropy(ld.flatten(0, 1), target.flatten(), reduction=reduction)
        actual = vocab_parallel_cross_entropy(ls, target, reduction=reduction)
        close(actual.flatten(), expected.flatten(), f"cross entropy {reduction}")
        grad = torch.randn_like(expected)
        expected.backward(grad)
        actual.backward(grad.view_as(actual))
        close(ls.grad, shard(ld.grad, -1, rank, world), f"cross entropy grad {reduction}")


class DenseMLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class ParallelMLP(nn.Module):
    def __init__(self, dense: DenseMLP):
        super().__init__()
        self.up = ColumnParallelLinear.from_dense(dense.up)
        self.down = RowParallelLinear.from_dense(dense.down)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class DenseAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def attend(self, x, heads):
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, heads, -1).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return x + self.out(attn.transpose(1, 2).reshape(batch, seq, -1))

    def forward(self, x):
        return self.attend(x, self.heads)


class ParallelAttention(DenseAttention):
    """Heads split across ranks: q, k and v colwise by head, the output projection rowwise."""

    def __init__(self, dense: DenseAttention, rank, world):
        nn.Module.__init__(self)
        self.heads = dense.heads // world
        dim = dense.qkv.in_features
        qkv = nn.Linear(dim, 3 * dim // world)
        # This rank's heads of q, k and v, laid out as [q | k | v] like the dense projection.
        rows = torch.cat([shard(part, 0, rank, world) for part in dense.qkv.weight.detach().chunk(3)])
        bias = torch.cat([shard(part, 0, rank, world) for part in dense.qkv.bias.detach().chunk(3)])
        qkv.weight, qkv.bias = nn.Parameter(rows), nn.Parameter(bias)
        self.qkv = ColumnParallelLinear(dim, 3 * dim, group=None, device="meta")
        self.qkv.weight, self.qkv.bias = qkv.weight, qkv.bias
        self.out = RowParallelLinear.from_dense(dense.out)

    def forward(self, x):
        return self.attend(x, self.heads)


def check_blocks_and_compile(rank, world):
    torch._dynamo.reset()
    dim = 16
    x = torch.randn(2, 5, dim)
    for dense, parallel in [
        (mlp := DenseMLP(dim), ParallelMLP(mlp)),
        (attention := DenseAttention(dim, 4), ParallelAttention(attention, rank, world)),
    ]:
        xd, xs = leaf(x), leaf(x)
        yd, ys = dense(xd), parallel(xs)
        close(ys, yd, f"{type(dense).__name__} forward")
        yd.square().sum().backward()
        ys.square().sum().backward()
        close(xs.grad, xd.grad, f"{type(dense).__name__} input grad")

        explanation = torch._dynamo.explain(parallel)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(parallel, fullgraph=True)
        xc = leaf(x)
        parallel.zero_grad()
        yc = compiled(xc)
        close(yc, ys.detach(), f"{type(dense).__name__} compiled forward")
        yc.square().sum().backward()
        close(xc.grad, xs.grad, f"{type(dense).__name__} compiled input grad")


@pytest.mark.parametrize("world", [2, 4])
def test_linear_layers_match_dense(world):
    run_ranks(world, check_linear_layers)


@pytest.mark.parametrize("world", [2, 3])
def test_embedding_and_cross_entropy_match_dense(world):
    run_ranks(world, check_embedding_and_cross_entropy)


def test_mlp_and_attention_blocks_compile_without_graph_breaks():
    run_ranks(2, check_blocks_and_compile)


# --- world size 1 --------------------------------------------------------------------------------

def test_world_of_one_is_local():
    x = torch.randn(4, 6, requires_grad=True)
    for fn in (torch_mp.copy_to_tp, torch_mp.reduce_from_tp, torch_mp.gather_from_tp, torch_mp.scatter_to_tp,
               torch_mp.reduce_scatter_to_sp, torch_mp.gather_from_sp):
        close(fn(x), x)
    dense = nn.Linear(6, 4)
    close(torch_mp.column_parallel_linear(x, dense.weight, dense.bias), dense(x))
    close(torch_mp.row_parallel_linear(x, dense.weight, dense.bias), dense(x))


def test_gradcheck_at_world_size_1():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: torch_mp.column_parallel_linear(*t), (x, w, b))
    assert torch.autograd.gradcheck(lambda *t: torch_mp.row_parallel_linear(*t), (x, w, b))
    assert torch.autograd.gradcheck(lambda t: torch_mp.gather_from_tp(torch_mp.copy_to_tp(t)), (x,))
    logits = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (6,))
    assert torch.autograd.gradcheck(lambda t: vocab_parallel_cross_entropy(t, target), (logits,))


# --- bad input -----------------------------------------------------------------------------------

def check_bad_input(rank, world):
    with pytest.raises(ValueError, match="out_features 6 is not divisible by the group size 4"):
        ColumnParallelLinear(8, 6)
    with pytest.raises(ValueError, match="input size 6 along dim 0 is not divisible by the group size 4"):
        torch_mp.scatter_to_tp(torch.randn(6, 2), 0)
    with pytest.raises(ValueError, match="no process group named 'nope' is registered"):
        torch.ops.torch_mp.reduce_from_tp(torch.randn(2), "nope", 4)
    with pytest.raises(ValueError, match="has 4 members but group_size is 3"):
        torch.ops.torch_mp.reduce_from_tp(torch.randn(2), dist.group.WORLD.group_name, 3)
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        torch_mp.column_parallel_linear(torch.randn(2, 4), torch.randn(3, 4, device="meta"))
    with pytest.raises(TypeError, match="weight has dtype Double but input has dtype Float"):
        torch_mp.row_parallel_linear(torch.randn(2, 4), torch.randn(3, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="expected a ProcessGroup, a 1-D DeviceMesh or None"):
        torch_mp.copy_to_tp(torch.randn(2), group="world")
    dist.barrier()  # every rank reaches here: no rank hangs on a half-issued collective


def test_bad_input_is_a_clear_error():
    run_ranks(4, check_bad_input)


def check_device_mesh(rank, world):
    mesh = dist.device_mesh.init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    close(torch_mp.reduce_from_tp(torch.ones(3), group=mesh), torch.full((3,), float(world)))
    close(torch_mp.reduce_from_tp(torch.ones(3), group=mesh["tp"]), torch.full((3,), float(world)))


def test_device_mesh_as_group():
    run_ranks(2, check_device_mesh)


def test_python_example_under_torchrun():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         os.path.join(root, "examples", "python", "tensor_parallel_mlp.py"), "--steps", "3"],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 3
    for line in lines:
        dense, parallel = line.split("dense ")[1].split("  tensor parallel ")
        assert abs(float(dense) - float(parallel)) < 1e-5, line
