"""Async TP against plain sequence parallelism: a Llama stack under tensor_parallel(sequence_parallel=True)
with and without async_tp, on 2 Gloo ranks (CPU, one thread per rank), measured in one run.

    python bench/bench_async_tp.py [--world 2] [--steps 10] [--compile]

For each size: the forward+backward step time of the plain path (gather_from_sp / reduce_scatter_to_sp
around the matmuls) and of async_tp with 1, 2 and 4 chunks per rank, and the ratio async / plain
(below 1: faster). What bounds the gain: the time the step's collectives take alone (the same
all-gathers and reduce-scatters, back to back, no compute); hiding all of it would give
(plain - collectives) / plain, printed as the bound, and "hidden" is the part of the collectives'
time the overlap saved.
"""
import argparse
import copy
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import torch_mp

SIZES = [  # name, hidden, intermediate, heads, layers, batch, sequence
    ("small", 128, 344, 4, 2, 2, 64),
    ("large", 512, 1376, 8, 2, 2, 256),
]
VARIANTS = [("plain", False), ("async", True), ("async x2", 2), ("async x4", 4)]


def llama(hidden, intermediate, heads, layers):
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                      max_position_embeddings=1024, use_cache=False)
    return transformers.LlamaModel(config)


def median_step_seconds(steps_by_label, rounds):
    """Median seconds of each step, timed in turns (one step of each per round) so that a machine
    whose load changes during the run weighs on all of them alike."""
    for step in steps_by_label.values():
        step()
        step()
    times = {label: [] for label in steps_by_label}
    for _ in range(rounds):
        for label, step in steps_by_label.items():
            dist.barrier()
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def collectives_alone(shard, layers, world):
    """The collectives of one sequence-parallel step, back to back: per block, forward: 2 all-gathers
    and 2 reduce-scatters of the activations; backward: the same again."""
    name = dist.group.WORLD.group_name
    full = torch.cat([shard] * world, 1)

    def step():
        for _ in range(2 * 2 * layers):
            torch.ops.torch_mp._all_gather(shard, 1, name, world)
            torch.ops.torch_mp._reduce_scatter(full, 1, name, world)
    return step


def worker(rank, world, store_path, steps, compile_, queue):
    torch.set_num_threads(1)
    # Each variant is a model of its own: one compiled frame each, more than dynamo keeps by default.
    torch._dynamo.config.recompile_limit = 4 * len(SIZES) * len(VARIANTS)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    results = []
    for size, hidden, intermediate, heads, layers, batch, seq in SIZES:
        torch.manual_seed(0)
        dense = llama(hidden, intermediate, heads, layers)
        ids = torch.randint(0, 256, (batch, seq))
        row = {"size": size, "shape": f"hidden {hidden}, {layers} layers, [{batch}, {seq}] tokens"}
        steps_by_label = {}
        for label, async_tp in VARIANTS:
            model = torch_mp.tensor_parallel(copy.deepcopy(dense), sequence_parallel=True, async_tp=async_tp)
            if compile_:
                model = torch.compile(model)

            def step(model=model):
                model(input_ids=ids).last_hidden_state.square().mean().backward()
            steps_by_label[label] = step
        steps_by_label["collectives"] = collectives_alone(torch.randn(batch, seq // world, hidden), layers, world)
        row.update(median_step_seconds(steps_by_label, steps))
        results.append(row)
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile each model (inductor)")
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(args.world, os.path.join(folder, "store"), args.steps, args.compile, queue),
                 nprocs=args.world)
    results = queue.get()
    mode = "compiled" if args.compile else "eager"
    print(f"Llama forward+backward, sequence parallel, {mode}, {args.world} Gloo ranks, 1 thread each, "
          f"median of {args.steps} steps (ms)")
    for row in results:
        plain = row["plain"]
        print(f"{row['size']} ({row['shape']}): plain {plain * 1e3:.1f}, collectives alone "
              f"{row['collectives'] * 1e3:.1f}, bound {(plain - row['collectives']) / plain:.2f}x")
        for label, _ in VARIANTS[1:]:
            hidden = (plain - row[label]) / row["collectives"] if row["collectives"] else 0.0
            print(f"    {label:9s} {row[label] * 1e3:8.1f}   ratio {row[label] / plain:.2f}   "
                  f"hidden {hidden:.0%} of the collectives' time")


if __name__ == "__main__":
    main()
