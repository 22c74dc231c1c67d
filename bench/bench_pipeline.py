"""torch_mp pipelines on this machine's CPU cores, measured in one run.

    python bench/bench_pipeline.py [--steps 5] [--chunks 1 4 8 16] [--timeline DIR]

A 2-stage pipeline over 2 processes (Gloo, one thread each) against one process with one thread,
same model (an MLP of 8 linear layers) and batch: the training-step speedup at each chunk count M
next to the bound 2M/(M+1), and next to the same bound with the stages' compute as slow as cutting
the batch into M micro-batches makes it on this CPU ("cut bound"); the same pipeline under torch.distributed.pipelining's ScheduleGPipe and
Schedule1F1B (step-time ratio ours / theirs); and the bubble, measured as 1 - speedup / 2 (what the
two ranks lose against a perfect split, communication included) next to (p-1)/(M+p-1).

``--timeline DIR`` records one more step of each torch_mp schedule and chunk count after the timed
ones and draws it (``torch_mp.plot_timeline``) as DIR/<schedule>_M<chunks>.png.

With a GPU (``--gpu``): the single-process split of a GPT across ["cuda:0", "cpu"] with chunks 1
and 8, tokens per second of each.
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
from torch import nn
from torch.nn import functional as F

import torch_mp

WIDTH, DEPTH = 1024, 8
BATCH = 1024  # micro-batches of 64 rows at M = 16: enough work per action to pay for its message


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers)


def make_batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, WIDTH, generator=generator), torch.randn(BATCH, WIDTH, generator=generator)


def timed(step, steps: int) -> float:
    step()  # warm-up: allocations, first-call paths
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dense_step_time(steps: int, chunks: int = 1) -> float:
    """One process, one thread; with ``chunks`` > 1 the batch goes through in micro-batches, one
    after another: what the stages' compute costs once cut into micro-batches."""
    torch.set_num_threads(1)
    model = make_model()
    inputs, target = make_batch()

    def step():
        for part, part_target in zip(inputs.tensor_split(chunks), target.tensor_split(chunks)):
            (F.mse_loss(model(part), part_target) / chunks).backward()
        model.zero_grad(set_to_none=True)

    return timed(step, steps)


def _torch_pipelining(schedule_name: str, chunks: int, rank: int, world: int):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    model = make_model()
    half = len(model) // 2
    part = model[:half] if rank == 0 else model[half:]
    inputs, target = make_batch()
    stage = PipelineStage(part, rank, world, torch.device("cpu"))
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
    schedule = kind(stage, n_microbatches=chunks, loss_fn=F.mse_loss)

    def step():
        if rank == 0:
            schedule.step(inputs)
        else:
            schedule.step(target=target, losses=[])
        part.zero_grad(set_to_none=True)

    return step


def _torch_mp(schedule_name: str, chunks: int, rank: int, world: int):
    model = torch_mp.pipeline(make_model(), chunks=chunks, schedule=schedule_name)
    inputs, target = make_batch()

    def step():
        model.train_step(inputs, target=target, loss_fn=F.mse_loss)
        model.zero_grad(set_to_none=True)

    def draw(path: str) -> None:
        model.train_step(inputs, target=target, loss_fn=F.mse_loss, timeline=True)
        model.zero_grad(set_to_none=True)
        if rank == 0:
            torch_mp.plot_timeline(model.last_timeline, path)
            print(f"{path}: measured bubble {model.last_timeline.bubble:.1%}", flush=True)

    step.draw = draw
    return step


def _rank(rank: int, world: int, store_path: str, chunk_counts, steps: int, results, timeline_dir=None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        for chunks in chunk_counts:
            for library, make in (("torch_mp", _torch_mp), ("pipelining", _torch_pipelining)):
                for schedule_name in ("gpipe", "1f1b"):
                    dist.barrier()
                    try:
                        step = make(schedule_name, chunks, rank, world)

                        def synchronized():
                            step()
                            dist.barrier()

                        seconds = timed(synchronized, steps)
                        if timeline_dir is not None and library == "torch_mp":
                            step.draw(os.path.join(timeline_dir, f"{schedule_name}_M{chunks}.png"))
                    except Exception as error:  # the reference may refuse a configuration
                        seconds = f"{type(error).__name__}: {str(error).splitlines()[0][:60]}"
                        dist.barrier()
                    if rank == 0:
                        results[(library, schedule_name, chunks)] = seconds
    finally:
        dist.destroy_process_group()


def gpu_split_throughput(steps: int) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
    from models import GPT

    torch.manual_seed(0)
    dense = GPT(vocab=32000, dim=1024, heads=16, depth=12, context=512)
    dense.head.weight = nn.Parameter(dense.tok.weight.detach().clone())  # untied: one device each
    ids = torch.randint(0, 32000, (32, 512))

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    print("\nGPT (12 x 1024) split across cuda:0 and cpu, batch 32 x 512 tokens")
    for chunks in (1, 8):
        model = torch_mp.split(copy.deepcopy(dense), ["cuda:0", "cpu"], chunks=chunks)
        if chunks == 1:
            def step():
                loss_fn(model(ids), ids.to(model.output_device)).backward()
        else:
            def step():
                model.train_step(ids, target=ids, loss_fn=loss_fn)
        seconds = timed(lambda: (step(), torch.cuda.synchronize()), steps)
        print(f"  chunks {chunks}: {ids.numel() / seconds:,.0f} tokens/s ({seconds * 1e3:.0f} ms/step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--gpu", action="store_true", help="also time the split GPT across cuda:0 and cpu")
    parser.add_argument("--timeline", metavar="DIR", help="draw one recorded step per torch_mp schedule into DIR")
    args = parser.parse_args()
    if args.timeline is not None:
        os.makedirs(args.timeline, exist_ok=True)

    reference = dense_step_time(args.steps)
    micro_batched = {chunks: dense_step_time(args.steps, chunks) for chunks in args.chunks}
    print(f"MLP {DEPTH} x {WIDTH}, batch {BATCH}, fp32; one process, one thread: {reference * 1e3:.1f} ms/step")
    print("micro-batched one after another (the compute a stage does, cut): "
          + ", ".join(f"M={m} {t * 1e3:.1f} ms" for m, t in micro_batched.items()) + "\n")
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(2, os.path.join(folder, "store"), args.chunks, args.steps, results, args.timeline),
                 nprocs=2)
        results = dict(results)

    # bound: 2M/(M+1); cut bound: the same with the stages' compute as slow as micro-batching makes it.
    print(f"{'M':>3} {'schedule':>8} {'torch_mp ms':>12} {'speedup':>8} {'bound':>6} {'cut bound':>10} "
          f"{'bubble':>7} {'(p-1)/(M+p-1)':>14} {'pipelining ms':>14} {'ours/theirs':>12}")
    for chunks in args.chunks:
        for schedule_name in ("gpipe", "1f1b"):
            ours = results[("torch_mp", schedule_name, chunks)]
            theirs = results[("pipelining", schedule_name, chunks)]
            speedup = reference / ours
            ratio = f"{ours / theirs:12.2f}" if isinstance(theirs, float) else f"{'n/a':>12}"
            theirs_text = f"{theirs * 1e3:14.1f}" if isinstance(theirs, float) else f"  {theirs}"
            cut_bound = reference / (micro_batched[chunks] / 2 * (chunks + 1) / chunks)
            print(f"{chunks:>3} {schedule_name:>8} {ours * 1e3:12.1f} {speedup:8.2f} {2 * chunks / (chunks + 1):6.2f} "
                  f"{cut_bound:10.2f} {1 - speedup / 2:7.2f} {1 / (chunks + 1):14.2f} {theirs_text} {ratio}")
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device here")
        gpu_split_throughput(args.steps)


if __name__ == "__main__":
    main()
