"""torch_mp tensor parallelism against DTensor's parallelize_module, on 2 Gloo ranks (CPU, one
thread per rank), measured in one run.

    python bench/bench_tensor_parallel.py [--world 2] [--steps 20]

For an MLP stack and a transformer block, small (overhead-bound) and large: the eager
forward+backward step time of each and the ratio ours / DTensor (target: <= 0.7 small, <= 1.0
large); the bytes all-reduced, gathered or scattered per step by each against the theoretical
minimum (one all-reduce of the activation per parallel block forward, one backward). Then the dispatch
overhead of copy_to_tp at world size 1 (target: under 10 us).
"""
import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import torch_mp
from torch_mp.nn import ColumnParallelLinear, RowParallelLinear, share_input_copy


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = MLP(dim)

    def forward(self, x):
        batch, seq, _ = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(batch, seq, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, -1)
        x = x + self.o(attn)
        return x + self.mlp.down(F.gelu(self.mlp.up(self.norm2(x))))


def build(kind, dim, depth):
    if kind == "mlp":
        return nn.Sequential(*(MLP(dim) for _ in range(depth)))
    return nn.Sequential(*(Block(dim, heads=8) for _ in range(depth)))


def colwise_rowwise(kind, depth):
    """The plan: names of the colwise and rowwise linears."""
    col, row = [], []
    for i in range(depth):
        if kind == "mlp":
            col.append(f"{i}.up"), row.append(f"{i}.down")
        else:
            col += [f"{i}.q", f"{i}.k", f"{i}.v", f"{i}.mlp.up"]
            row += [f"{i}.o", f"{i}.mlp.down"]
    return col, row


def shard_torch_mp(model, kind, depth, world):
    col, row = colwise_rowwise(kind, depth)
    for name in col:
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, ColumnParallelLinear.from_dense(model.get_submodule(name)))
    for name in row:
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, RowParallelLinear.from_dense(model.get_submodule(name)))
    for module in model.modules():
        if isinstance(module, Block):
            module.heads //= world
            # q, k and v read one input: one copy_to_tp all-reduces its gradient once (as tensor_parallel does).
            share_input_copy([module.q, module.k, module.v])
    return model


def shard_dtensor(model, kind, depth, world):
    mesh = dist.device_mesh.init_device_mesh("cpu", (world,))
    col, row = colwise_rowwise(kind, depth)
    plan = {**{name: ColwiseParallel() for name in col}, **{name: RowwiseParallel() for name in row}}
    parallelize_module(model, mesh, plan)
    for module in model.modules():
        if isinstance(module, Block):
            module.heads //= world
    return model


class CountBytes(TorchDispatchMode):
    """Bytes each rank hands to collectives per step: all-reduce payloads, all-gather and
    reduce-scatter inputs. DTensor ops are let through first (NotImplemented, as PyTorch's
    CommDebugMode does) so that the functional collectives they desugar into are seen."""

    PAYLOAD_IS_FIRST_ARG = {
        # DTensor's functional collectives
        "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor",
        # torch_mp: the conjugate ops communicate in forward as below; their backward calls the
        # conjugate op, which this mode sees as well
        "reduce_from_tp", "gather_from_tp", "reduce_scatter_to_sp", "gather_from_sp",
        "_all_reduce", "_all_gather", "_reduce_scatter",
        # torch_mp's in-place all-reduce (the column-parallel backward's input gradient)
        "_all_reduce_start_",
    }

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        name = func._overloadpacket.__name__
        if name in self.PAYLOAD_IS_FIRST_ARG:
            self.bytes += args[0].numel() * args[0].element_size()
        elif name == "_row_parallel_linear" and args[4] > 1:
            # All-reduces its output in place: input's shape with the weight's rows as features.
            self.bytes += args[0].numel() // args[0].shape[-1] * args[1].shape[0] * args[0].element_size()
        return func(*args, **(kwargs or {}))


def step_times(models, x, steps):
    """Median forward+backward time of each model, the models taking turns step by step so that
    both see the same machine load."""
    def step(model):
        model(x).sum().backward()
    for model in models:
        for _ in range(3):
            step(model)
    times = [[] for _ in models]
    for _ in range(steps):
        for model, record in zip(models, times):
            dist.barrier()
            start = time.perf_counter()
            step(model)
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def bytes_per_step(model, x):
    with CountBytes() as counter:
        model(x).sum().backward()
    return counter.bytes


def worker(rank, world, store_path, steps, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = []
    for kind, size, dim, batch, seq, depth in [("mlp", "small", 64, 4, 16, 4), ("mlp", "large", 1024, 4, 128, 2),
                                               ("block", "small", 64, 4, 16, 2), ("block", "large", 512, 4, 128, 1)]:
        torch.manual_seed(0)
        dense = build(kind, dim, depth)
        x = torch.randn(batch, seq, dim)
        ours = shard_torch_mp(_copy(dense, kind, dim, depth), kind, depth, world)
        theirs = shard_dtensor(_copy(dense, kind, dim, depth), kind, depth, world)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
        # One all-reduce of the activation per parallel block (an MLP; an attention) forward, one
        # backward; the first MLP's input needs no gradient (a block's first input is a LayerNorm output).
        parallel_blocks = depth if kind == "mlp" else 2 * depth
        backward_reductions = parallel_blocks - 1 if kind == "mlp" else parallel_blocks
        minimum = (parallel_blocks + backward_reductions) * x.numel() * x.element_size()
        t_ours, t_theirs = step_times([ours, theirs], x, steps)
        results.append((f"{kind} {size} (dim {dim}, {batch}x{seq} tokens, {depth} deep)", t_ours, t_theirs,
                        bytes_per_step(ours, x), bytes_per_step(theirs, x), minimum))
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def _copy(dense, kind, dim, depth):
    model = build(kind, dim, depth)
    model.load_state_dict(dense.state_dict())
    return model


def dispatch_overhead_us(calls=20000):
    x = torch.randn(8)
    for fn, label in [(lambda: torch_mp.copy_to_tp(x), "torch_mp.copy_to_tp (Python wrapper)"),
                      (lambda: torch.ops.torch_mp.copy_to_tp(x, "", 1), "torch.ops.torch_mp.copy_to_tp"),
                      (lambda: x.clone(), "Tensor.clone (reference)")]:
        for _ in range(1000):
            fn()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        yield label, (time.perf_counter() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(args.world, os.path.join(folder, "store"), args.steps, queue), nprocs=args.world)
    results = queue.get()

    print(f"eager forward+backward, {args.world} Gloo ranks, 1 thread each, median of {args.steps} steps")
    print(f"{'model':<48} {'torch_mp ms':>11} {'DTensor ms':>10} {'ratio':>6}   {'bytes/step ours':>15} "
          f"{'DTensor':>10} {'minimum':>10} {'ours/min':>8} {'DT/min':>7}")
    for name, t_ours, t_theirs, b_ours, b_theirs, minimum in results:
        print(f"{name:<48} {t_ours * 1e3:>11.2f} {t_theirs * 1e3:>10.2f} {t_ours / t_theirs:>6.2f}   "
              f"{b_ours:>15} {b_theirs:>10} {minimum:>10} {b_ours / minimum:>8.2f} {b_theirs / minimum:>7.2f}")
    print("(blocks: q, k and v are separate colwise linears sharing one copy_to_tp, whose backward all-reduces "
          "their input gradient once)")
    print("\ndispatch overhead at world size 1 (8-element tensor)")
    for label, us in dispatch_overhead_us():
        print(f"  {label:<40} {us:6.2f} us/call")


if __name__ == "__main__":
    main()
