"""torch.compile over tensor parallelism, on 2 Gloo ranks (CPU, one thread each), measured in one run:
the step time of torch_mp's tensor-parallel transformer blocks compiled against eager, and against
DTensor's parallelize_module under torch.compile; each one's graph-break count.

    python bench/bench_compile.py [--steps 20] [--dim 256] [--depth 2]
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

from bench_tensor_parallel import _copy, build, shard_dtensor, shard_torch_mp


def median_step(step, steps):
    for _ in range(3):  # compiles on the first
        step()
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank, world, store_path, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    torch.manual_seed(0)
    dense = build("block", args.dim, args.depth)
    x = torch.randn(4, 64, args.dim)
    results = {}
    for name, shard in (("torch_mp", shard_torch_mp), ("DTensor", shard_dtensor)):
        model = shard(_copy(dense, "block", args.dim, args.depth), "block", args.depth, world)
        torch._dynamo.reset()
        breaks = torch._dynamo.explain(lambda t: model(t).sum())(x).graph_break_count
        compiled = torch.compile(model)
        eager_time = median_step(lambda: model(x).sum().backward(), args.steps)
        compiled_time = median_step(lambda: compiled(x).sum().backward(), args.steps)
        results[name] = (eager_time, compiled_time, breaks)
    if rank == 0:
        queue.put(results)
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
    results = queue.get()
    print(f"transformer blocks (dim {args.dim}, depth {args.depth}, 4x64 tokens), 2 Gloo ranks, "
          f"forward+backward, median of {args.steps} steps")
    print(f"{'':<10} {'eager ms':>9} {'compiled ms':>11} {'compiled/eager':>14} {'graph breaks':>12}")
    for name, (eager, compiled, breaks) in results.items():
        print(f"{name:<10} {eager * 1e3:>9.2f} {compiled * 1e3:>11.2f} {compiled / eager:>14.2f} {breaks:>12}")
    ours, theirs = results["torch_mp"][1], results["DTensor"][1]
    print(f"compiled step time, torch_mp / DTensor: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
