"""The start/wait pair of primitive ops (an in-place all-reduce that returns at once, and the wait
that completes it), the copy-free linear layers built on it, and one copy_to_tp shared by
column-parallel siblings: against the dense model on 2 Gloo ranks, eager and compiled."""
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.library import opcheck
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import torch_mp
from distributed import run_ranks
from tensors import close as check_close, leaf
from torch_mp.nn import ColumnParallelLinear, RowParallelLinear, share_input_copy

# Gradients here are sums of partial products over ranks, added in another order than the dense
# matmul adds them, and reach ~10-100 (a squared loss of non-trivial weights): float32 rounding of
# such sums is ~1e-5 absolute.
RTOL, ATOL = 1e-5, 1e-5


def close(actual, expected, msg=""):
    check_close(actual, expected, msg, RTOL, ATOL)


# --- the start/wait pair --------------------------------------------------------------------------

def check_start_and_wait(rank, world):
    group = dist.group.WORLD.group_name
    # Each rank's own values: the sum is known.
    tensor = torch.arange(6.0).reshape(2, 3) * (rank + 1)
    torch.ops.torch_mp._all_reduce_start_(tensor, "sum", group, world)
    independent = torch.randn(64, 64) @ torch.randn(64, 64)  # compute while the collective runs
    torch.ops.torch_mp._wait_(tensor, [], group, world)
    close(tensor, torch.arange(6.0).reshape(2, 3) * sum(range(1, world + 1)))
    assert independent.shape == (64, 64)

    maximum = torch.full((4,), float(rank))
    torch.ops.torch_mp._all_reduce_start_(maximum, "max", group, world)
    torch.ops.torch_mp._wait_(maximum, [], group, world)
    close(maximum, torch.full((4,), float(world - 1)))

    # A wait with nothing in flight (never started, or waited already) is an error, not a no-op.
    with pytest.raises(RuntimeError, match="no collective is in flight on this tensor"):
        torch.ops.torch_mp._wait_(tensor, [], group, world)
    # So is a second start on a tensor still in flight, and an in-place reduction of a view with gaps.
    busy = torch.ones(3)
    torch.ops.torch_mp._all_reduce_start_(busy, "sum", group, world)
    with pytest.raises(RuntimeError, match="already in flight"):
        torch.ops.torch_mp._all_reduce_start_(busy, "sum", group, world)
    torch.ops.torch_mp._wait_(busy, [], group, world)
    close(busy, torch.full((3,), float(world)))
    with pytest.raises(ValueError, match="must be contiguous"):
        torch.ops.torch_mp._all_reduce_start_(torch.ones(4, 4).t(), "sum", group, world)


def test_start_and_wait_reduce_in_place_on_2_ranks():
    run_ranks(2, check_start_and_wait)


def test_start_and_wait_at_world_size_1_are_local_and_pass_opcheck():
    tensor = torch.arange(4.0)
    torch.ops.torch_mp._all_reduce_start_(tensor, "sum", "", 1)
    torch.ops.torch_mp._wait_(tensor, [], "", 1)
    close(tensor, torch.arange(4.0))
    opcheck(torch.ops.torch_mp._all_reduce_start_.default, (torch.randn(3), "sum", "", 1))
    opcheck(torch.ops.torch_mp._wait_.default, (torch.randn(3), [torch.randn(2)], "", 1))


# --- linear layers on the pair: dense numbers, compiled with the collective around the matmul ------

class DenseBlock(nn.Module):
    """Attention with separate q, k and v projections, then an MLP: a transformer block."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        for parameter in self.parameters():  # non-trivial norms too
            nn.init.normal_(parameter, std=0.3)

    def forward(self, x, memory=None):
        batch, seq, _ = x.shape
        h = self.norm1(x)
        source = h if memory is None else memory
        q = self.q(h)
        k, v = self.k(source), self.v(source)
        q, k, v = (t.view(batch, seq, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, -1)
        x = x + self.o(attn)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


def parallel_block(dense, world, share=True):
    block = DenseBlock(dense.q.in_features, dense.heads)
    block.load_state_dict(dense.state_dict())
    for name in ("q", "k", "v", "up"):
        setattr(block, name, ColumnParallelLinear.from_dense(getattr(dense, name)))
    for name in ("o", "down"):
        setattr(block, name, RowParallelLinear.from_dense(getattr(dense, name)))
    block.heads //= world
    if share:
        share_input_copy([block.q, block.k, block.v])
    return block


class CountAllReduces(TorchDispatchMode):
    """Number of all-reduces started, whichever op starts them."""

    NAMES = {"_all_reduce", "_all_reduce_start_", "reduce_from_tp", "_row_parallel_linear"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._overloadpacket.__name__ in self.NAMES
        return func(*args, **(kwargs or {}))


def grads(model, x, memory=None):
    model.zero_grad()
    xs = leaf(x)
    ms = None if memory is None else leaf(memory)
    y = model(xs, ms)
    y.square().sum().backward()
    out = {"y": y.detach(), "x.grad": xs.grad}
    if ms is not None:
        out["memory.grad"] = ms.grad
    return out


def check_block(rank, world):
    torch.manual_seed(0)
    dim, heads = 16, 4
    dense = DenseBlock(dim, heads)
    x, memory = torch.randn(2, 5, dim), torch.randn(2, 5, dim)
    for share in (True, False):
        parallel = parallel_block(dense, world, share)
        for mem in (None, memory):  # self-attention: q, k, v share their input; then k and v read another
            expected = grads(dense, x, mem)
            with CountAllReduces() as counter:
                actual = grads(parallel, x, mem)
            for key in expected:
                close(actual[key], expected[key], f"share={share} memory={mem is not None}: {key}")
            for name, dim_ in (("q", 0), ("k", 0), ("v", 0), ("up", 0), ("o", 1), ("down", 1)):
                close(getattr(parallel, name).weight.grad,
                      getattr(dense, name).weight.grad.chunk(world, dim_)[rank], f"{name}.weight.grad")
            close(parallel.norm1.weight.grad, dense.norm1.weight.grad, "norm1.weight.grad")
            # Forward: o and down; backward: the input gradients of q, k, v (once when shared and
            # self-attention; the memory's copy besides with cross-attention) and of up.
            qkv_reductions = (1 if mem is None else 2) if share else 3
            assert counter.count == 2 + qkv_reductions + 1, (share, mem is not None, counter.count)

    # An input changed in place between the siblings' calls is copied again: no stale copy.
    parallel = parallel_block(dense, world)
    h = leaf(torch.randn(2, 5, dim))
    first = parallel.q(h)
    with torch.no_grad():
        h.mul_(2)
    second = parallel.k(h)
    close(second, F.linear(h, parallel.k.weight.to_local(), parallel.k.bias.to_local()))  # DTensor parameters
    (first.sum() + second.sum()).backward()
    close(h.grad, (dense.q.weight.sum(0) + dense.k.weight.sum(0)).expand(2, 5, dim))

    # q called without its siblings: the shared copy still holds that input; a deep copy of the
    # block starts with its own, empty one, shared by its own siblings.
    parallel.q(leaf(x))
    copied = copy.deepcopy(parallel)
    shared = copied.q.shared_input_copy
    assert shared.entry is None and shared is not parallel.q.shared_input_copy
    assert copied.k.shared_input_copy is shared and copied.v.shared_input_copy is shared
    close(grads(copied, x)["x.grad"], grads(dense, x)["x.grad"], "deep copy")


def test_block_matches_dense_with_shared_and_separate_copies():
    run_ranks(2, check_block)


def check_compiled(rank, world):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    dim = 16
    dense = DenseBlock(dim, 4)
    x = torch.randn(2, 5, dim)
    parallel = parallel_block(dense, world)
    expected = grads(parallel, x)
    explanation = torch._dynamo.explain(parallel)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(parallel, fullgraph=True)
    actual, code = run_and_get_code(lambda: grads(compiled, x))
    for key in expected:
        close(actual[key], expected[key], f"compiled {key}")
    close(actual["x.grad"], grads(dense, x)["x.grad"], "compiled against dense")
    # The byte minimum compiled as in eager: the input gradient is all-reduced twice in backward, once
    # for q, k and v (the backward of their one shared copy_to_tp) and once for up.
    calls = {op: sum(source.count(f"torch.ops.torch_mp.{op}.default(") for source in code)
             for op in ("copy_to_tp", "reduce_from_tp", "_all_reduce_start_")}
    assert calls == {"copy_to_tp": 1, "reduce_from_tp": 1, "_all_reduce_start_": 1}, calls
    backward = next(source for source in code if "_wait_" in source and "_all_reduce_start_" in source)
    # The input gradient of `up` is reduced in place (no copy in between) while the weight gradient's
    # matmul runs: the start comes before that matmul, the wait after.
    start = backward.index("torch.ops.torch_mp._all_reduce_start_.default(")
    wait = backward.index("torch.ops.torch_mp._wait_.default(", start)
    assert "extern_kernels.mm(" in backward[start:wait], backward[start:wait]


def test_compiled_block_overlaps_the_reduction_with_the_weight_gradient():
    run_ranks(2, check_compiled)


class ModifiesBetweenSiblings(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.q, self.k = block.q, block.k

    def forward(self, h):
        first = self.q(h)
        h.mul_(2)
        return first.sum() + self.k(h).sum()


def check_compiled_stale_copy_is_an_error(rank, world):
    # Eager mode copies an input modified between siblings again (check_block); a compiled graph
    # cannot choose at run time, so it refuses to compile rather than reuse a stale copy.
    torch._dynamo.reset()
    model = ModifiesBetweenSiblings(parallel_block(DenseBlock(16, 4), world))
    compiled = torch.compile(model, fullgraph=True)
    with pytest.raises(Exception, match="modified in place between sibling layers"):
        compiled(torch.randn(2, 5, 16).requires_grad_() * 1)


def test_compiled_input_modified_between_siblings_is_an_error():
    run_ranks(2, check_compiled_stale_copy_is_an_error)


def check_aot_eager_is_a_clear_error(rank, world):
    # A backend that copies mutated tensors instead of reinplacing them would copy a buffer the
    # backend is still writing: the wait refuses, rather than return those bytes.
    torch._dynamo.reset()
    layer = ColumnParallelLinear(8, 8)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="no collective is in flight on this tensor"):
        compiled(leaf(torch.randn(3, 8))).sum().backward()


def test_a_backend_that_does_not_reinplace_gets_a_clear_error():
    run_ranks(2, check_aot_eager_is_a_clear_error)


class Stack(nn.Sequential):
    def forward(self, x, memory=None):
        for block in self:
            x = block(x, memory)
        return x


def check_tensor_parallel_shares_copies(rank, world):
    torch.manual_seed(0)
    dense = Stack(DenseBlock(16, 4), DenseBlock(16, 4))
    sharded = copy.deepcopy(dense)
    torch_mp.tensor_parallel(sharded, plan={
        f"{i}.{name}": style for i in range(2)
        for name, style in (("q", "colwise"), ("k", "colwise"), ("v", "colwise"), ("o", "rowwise"),
                            ("up", "colwise"), ("down", "rowwise"))})
    for block in sharded:
        # Siblings by parent and input size: up reads another input, and copies that one itself.
        shared = block.q.shared_input_copy
        assert shared is not None and block.k.shared_input_copy is shared and block.v.shared_input_copy is shared
        assert block.up.shared_input_copy is shared
    x = torch.randn(2, 5, 16)
    expected = grads(dense, x)
    with CountAllReduces() as counter:
        actual = grads(sharded, x)
    for key in expected:
        close(actual[key], expected[key], f"tensor_parallel {key}")
    assert counter.count == 2 * 4, counter.count  # per block: o, down forward; qkv, up backward
    assert all(block.q.shared_input_copy.entry is None for block in sharded)  # nothing kept after the step


def test_tensor_parallel_shares_one_copy_among_siblings():
    run_ranks(2, check_tensor_parallel_shares_copies)


class CallsOnly(nn.Module):
    """A forward that calls some of a block's column-parallel siblings (q only, or k then q)."""

    def __init__(self, block, names):
        super().__init__()
        self.block, self.names = block, names

    def forward(self, h):
        return sum(getattr(self.block, name)(h).sum() for name in self.names)


def check_skipped_siblings(rank, world):
    # A forward that calls q alone leaves its copy of the input behind (k and v never came); the
    # next forward, given that input modified in place meanwhile, copies it afresh: eager, compiled,
    # and after a sibling order change that starts with a sibling that did not use it.
    torch.manual_seed(0)
    dense_block = DenseBlock(16, 4)
    for compiled, orders in ((False, (["q"], ["q"], ["k", "q"])), (True, (["q"], ["q"]))):
        torch._dynamo.reset()
        block = parallel_block(dense_block, world)
        x = torch.randn(2, 5, 16)
        xd, xs = leaf(x), leaf(x)
        for names in orders:
            dense, parallel = CallsOnly(dense_block, names), CallsOnly(block, names)
            model = torch.compile(parallel, fullgraph=True) if compiled else parallel
            xd.grad = xs.grad = None
            expected, actual = dense(xd), model(xs)
            expected.backward()
            actual.backward()
            total = actual.detach().clone()
            dist.all_reduce(total)  # each rank holds its heads' part of the sum
            close(total, expected.detach(), f"compiled={compiled} {names}: forward")
            close(xs.grad, xd.grad, f"compiled={compiled} {names}: input grad")
            with torch.no_grad():
                xd.mul_(1.5)
                xs.mul_(1.5)


def test_a_forward_that_skips_siblings_leaves_no_stale_copy():
    run_ranks(2, check_skipped_siblings)
