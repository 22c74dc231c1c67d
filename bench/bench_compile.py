"""torch.compile over tensor parallelism, on 2 Gloo ranks (CPU, one thread each), measured in one run:
the step time of torch_mp's tensor-parallel transformer blocks compiled against eager, and against
DTensor's parallelize_module under torch.compile; each one's graph-break count; and the share of
our eager step that compiling cannot shorten (matmuls, attention kernels, collectives), a lower
bound on compiled / eager.

    python bench/bench_compile.py [--steps 20] [--dim 256] [--depth 2]
"""
import argparse
import datetime
import os
import tempfile
import time

# The profiler's device probe logs an error on a machine without a GPU; its other lines stay.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench_tensor_parallel import _copy, build, shard_dtensor, shard_torch_mp, step_times


# What compiling does not shorten: the matmuls and attention kernels (the same aten kernels compiled
# or not) and the collectives with the time spent waiting for the peer rank.
FIXED = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product", "c10d::",
         "torch_mp::_wait_")


def fixed_share(model, x, steps=5):
    """The share of an eager step's time spent in FIXED operators (self time, this rank): a lower
    bound on compiled / eager for this model and machine."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        start = time.perf_counter()
        for _ in range(steps):
            model(x).sum().backward()
        elapsed = time.perf_counter() - start
    fixed = sum(event.self_cpu_time_total for event in profile.key_averages() if event.key.startswith(FIXED))
    return fixed / 1e6 / elapsed


def worker(rank, world, store_path, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    torch.manual_seed(0)
    dense = build("block", args.dim, args.depth)
    x = torch.randn(4, 64, args.dim)
    models, breaks = {}, {}
    for name, shard in (("torch_mp", shard_torch_mp), ("DTensor", shard_dtensor)):
        model = shard(_copy(dense, "block", args.dim, args.depth), "block", args.depth, world)
        breaks[name] = torch._dynamo.explain(lambda t: model(t).sum())(x).graph_break_count
        models[name] = (model, torch.compile(model))
    # All four take turns step by step (compiling in the warm-up), so that they see the same load.
    times = step_times([m for pair in models.values() for m in pair], x, args.steps)
    results = {name: (times[2 * i], times[2 * i + 1], breaks[name]) for i, name in enumerate(models)}
    bound = fixed_share(models["torch_mp"][0], x)
    if rank == 0:
        queue.put((results, bound))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(2, os.path.join(folder, "store"), args, queue), nprocs=2)
    results, bound = queue.get()
    print(f"transformer blocks (dim {args.dim}, depth {args.depth}, 4x64 tokens), 2 Gloo ranks, "
          f"forward+backward, median of {args.steps} steps taken in turns")
    print(f"{'':<10} {'eager ms':>9} {'compiled ms':>11} {'compiled/eager':>14} {'graph breaks':>12}")
    for name, (eager, compiled, breaks) in results.items():
        print(f"{name:<10} {eager * 1e3:>9.2f} {compiled * 1e3:>11.2f} {compiled / eager:>14.2f} {breaks:>12}")
    ours, theirs = results["torch_mp"][1], results["DTensor"][1]
    print(f"compiled step time, torch_mp / DTensor: {ours / theirs:.2f}")
    print(f"torch_mp eager step: {bound:.0%} in matmuls, attention kernels and collectives (with the waits for "
          f"the peer), which compiling leaves as they are: compiled/eager >= {bound:.2f} on this machine")


if __name__ == "__main__":
    main()
