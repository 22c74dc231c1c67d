"""Compiled pipeline stages against eager ones, measured in one run.

    python bench/bench_pipeline_compile.py [--steps 5] [--chunks 4] [--backend inductor]

A GPT (tests/python/models.py) trained by ``train_step`` with its placed modules compiled
(``model.compile(backend=...)``: each stage's layers compiled, the schedule eager) against the same
pipeline eager: the training-step time ratio compiled / eager, in one process (``split`` across two
CPU stages) and over 2 processes (``pipeline``, Gloo, one stage each). Next to them, the unpipelined
model compiled whole against eager: what compiling can gain on this model and CPU. One thread per
process; the first step of each (where compilation happens) is a warm-up, then eager and compiled
steps alternate and each reports its median, so that a machine shared with other work slows both
alike.
"""
import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

import torch_mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
from models import GPT  # noqa: E402

VOCAB, DIM, HEADS, DEPTH, CONTEXT, BATCH = 512, 128, 4, 4, 64, 32


def make_model() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab=VOCAB, dim=DIM, heads=HEADS, depth=DEPTH, context=CONTEXT)


def make_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=torch.Generator().manual_seed(1))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _step(model, ids, pipelined: bool):
    def step():
        if pipelined:
            model.train_step(ids, target=ids, loss_fn=loss_fn)
        else:
            loss_fn(model(ids), ids).backward()
        model.zero_grad(set_to_none=True)

    return step


def alternating(step_of: dict, steps: int) -> dict:
    """The median time of each of ``step_of``'s steps, run in turn after one warm-up each."""
    for step in step_of.values():
        step()
    times = {key: [] for key in step_of}
    for _ in range(steps):
        for key, step in step_of.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def one_process(steps: int, chunks: int, backend: str) -> dict:
    torch.set_num_threads(1)
    ids = make_batch()
    seconds = {}
    for pipelined in (False, True):
        step_of = {}
        for compiled in (False, True):
            model = make_model()
            if pipelined:
                model = torch_mp.split(model, ["cpu", "cpu"], chunks=chunks, schedule="1f1b")
            if compiled:
                model.compile(backend=backend)
            step_of[(pipelined, compiled)] = _step(model, ids, pipelined)
        seconds.update(alternating(step_of, steps))
    return seconds


def _rank(rank: int, world: int, store_path: str, steps: int, chunks: int, backend: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        ids = make_batch()
        step_of = {}
        for compiled in (False, True):
            model = torch_mp.pipeline(copy.deepcopy(make_model()), chunks=chunks, schedule="1f1b")
            if compiled:
                model.compile(backend=backend)
            step_of[compiled] = lambda step=_step(model, ids, pipelined=True): (dist.barrier(), step(), dist.barrier())
        seconds = alternating(step_of, steps)
        if rank == 0:
            results.update(seconds)
    finally:
        dist.destroy_process_group()


def two_processes(steps: int, chunks: int, backend: str) -> dict:
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(2, os.path.join(folder, "store"), steps, chunks, backend, results), nprocs=2)
        return dict(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()

    print(f"GPT {DEPTH} x {DIM} ({HEADS} heads), batch {BATCH} x {CONTEXT} tokens, fp32, 1F1B, M={args.chunks}, "
          f"backend {args.backend}; training-step time (ms) and compiled / eager")
    local = one_process(args.steps, args.chunks, args.backend)
    ranks = two_processes(args.steps, args.chunks, args.backend)
    rows = [("unpipelined, one process", local[(False, False)], local[(False, True)]),
            ("split, one process, 2 stages", local[(True, False)], local[(True, True)]),
            ("pipeline, 2 processes", ranks[False], ranks[True])]
    print(f"{'':30} {'eager ms':>9} {'compiled ms':>12} {'compiled/eager':>15}")
    for name, eager, compiled in rows:
        print(f"{name:30} {eager * 1e3:9.1f} {compiled * 1e3:12.1f} {compiled / eager:15.2f}")


if __name__ == "__main__":
    main()
