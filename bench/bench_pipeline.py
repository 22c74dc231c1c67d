"""torch_mp pipelines on this machine's CPU cores, measured in one run.

    python bench/bench_pipeline.py [--steps 3] [--chunks 4 8 16] [--ranks 2 4] [--schedules gpipe 1f1b ...]
                                [--timeline DIR]

Each schedule of ``SCHEDULES`` on p processes (Gloo, one thread each) against one process with one
thread, same model (an MLP of 8 linear layers) and batch, at each chunk count M:

- speedup: one process's training step / the pipeline's;
- bound: p*M/(M+p-1) (the bubble of GPipe and 1F1B), at most the number of cores;
- cut bound: the same with the stages' compute as slow as cutting the batch into M micro-batches
  makes it on this CPU (the one-process step run micro-batch after micro-batch, in CPU time);
- bubble: 1 - speedup/p, what the p processes lose against a perfect split, communication
  included, next to (p-1)/(M+p-1);
- cpu ms, busy, cpu speedup: the busiest process's CPU time per step, its share of the step, and
  one process's CPU time per step over it: where busy is well below 1 - bubble, the processes
  waited for a core (this machine's other work) or for each other's messages, and cpu speedup is
  what the step would gain were each process alone on its core with no bubble;
- ours/theirs: step time against torch.distributed.pipelining's matching schedule, same model,
  stages and transport; cpu ours/theirs: the same for the busiest process's CPU time, which the
  machine's other work disturbs less than the step time.

What bounds it on this CPU is printed first: each micro-batch's compute cost at each M (smaller
micro-batches are slower per row), and for each M the time of one micro-batch's activation sent
between two processes, with the share of the step that the pipeline's messages take. A schedule
torch_mp does not have (yet) shows "n/a" in its rows.

``--timeline DIR`` records one more step of each torch_mp schedule, process count and chunk count
after the timed ones and draws it (``torch_mp.plot_timeline``) as DIR/<schedule>_p<processes>_M<chunks>.png.

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

# torch_mp's schedule: (torch.distributed.pipelining's matching schedule, stages per rank).
SCHEDULES = {
    "gpipe": ("ScheduleGPipe", 1),
    "1f1b": ("Schedule1F1B", 1),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", 2),
    "zb_h1": ("ScheduleInterleavedZeroBubble", 1),
    "zbv": ("ScheduleZBVZeroBubble", 2),
}


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers)


def make_batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, WIDTH, generator=generator), torch.randn(BATCH, WIDTH, generator=generator)


def timed(step, steps: int):
    """The median wall time of ``step`` and its mean CPU time (this process's threads), in seconds."""
    step()  # warm-up: allocations, first-call paths
    times = []
    cpu = time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (time.process_time() - cpu) / steps


def dense_step_time(steps: int, chunks: int = 1):
    """One process, one thread; with ``chunks`` > 1 the batch goes through in micro-batches, one
    after another: what the stages' compute costs once cut into micro-batches. Returns the
    median step time and the CPU time per step, in seconds."""
    torch.set_num_threads(1)
    model = make_model()
    inputs, target = make_batch()

    def step():
        for part, part_target in zip(inputs.tensor_split(chunks), target.tensor_split(chunks)):
            (F.mse_loss(model(part), part_target) / chunks).backward()
        model.zero_grad(set_to_none=True)

    return timed(step, steps)


def stage_indices(schedule_name: str, rank: int, world: int):
    """The stages rank ``rank`` holds: one, two interleaved (s = rank + k * world), or two in a V."""
    per_rank = SCHEDULES[schedule_name][1]
    if schedule_name == "zbv":
        return [rank, 2 * world - 1 - rank]
    return [rank + k * world for k in range(per_rank)]


def _torch_pipelining(schedule_name: str, chunks: int, rank: int, world: int):
    from torch.distributed.pipelining import PipelineStage, schedules

    model = make_model()
    num_stages = world * SCHEDULES[schedule_name][1]
    per_stage = len(model) // num_stages
    indices = stage_indices(schedule_name, rank, world)
    parts = [model[s * per_stage:(s + 1) * per_stage] for s in indices]
    stages = [PipelineStage(part, s, num_stages, torch.device("cpu")) for part, s in zip(parts, indices)]
    kind = getattr(schedules, SCHEDULES[schedule_name][0])
    single = issubclass(kind, schedules.PipelineScheduleSingle)
    schedule = kind(stages[0] if single else stages, n_microbatches=chunks, loss_fn=F.mse_loss)
    inputs, target = make_batch()
    args = (inputs,) if 0 in indices else ()
    kwargs = dict(target=target, losses=[]) if num_stages - 1 in indices else {}

    def step():
        schedule.step(*args, **kwargs)
        for part in parts:
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


def transfer_time(chunks: int, rank: int, rounds: int = 10) -> float:
    """Seconds one micro-batch's activation takes from rank 0 to rank 1 (half a round trip)."""
    buffer = torch.randn(BATCH // chunks, WIDTH)
    start = time.perf_counter()
    for _ in range(rounds):
        if rank == 0:
            dist.send(buffer, 1)
            dist.recv(buffer, 1)
        elif rank == 1:
            dist.recv(buffer, 0)
            dist.send(buffer, 0)
    return (time.perf_counter() - start) / (2 * rounds)


def _rank(rank: int, world: int, store_path: str, schedule_names, chunk_counts, steps: int, results,
          timeline_dir=None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        for chunks in chunk_counts:
            dist.barrier()
            seconds = transfer_time(chunks, rank)
            if rank == 0:
                results[("transfer", world, chunks)] = seconds
            for schedule_name in schedule_names:
                for library, make in (("torch_mp", _torch_mp), ("pipelining", _torch_pipelining)):
                    dist.barrier()
                    if library == "pipelining" and not isinstance(results.get(("torch_mp", world, schedule_name, chunks),
                                                                              0.0), float):
                        continue  # nothing to compare with
                    try:
                        step = make(schedule_name, chunks, rank, world)

                        def synchronized():
                            step()
                            dist.barrier()

                        seconds, cpu = timed(synchronized, steps)
                        if timeline_dir is not None and library == "torch_mp":
                            step.draw(os.path.join(timeline_dir, f"{schedule_name}_p{world}_M{chunks}.png"))
                        # The busiest rank's CPU time per step (threads included).
                        cpu = torch.tensor([cpu], dtype=torch.float64)
                        dist.all_reduce(cpu, op=dist.ReduceOp.MAX)
                        if rank == 0:
                            results[("cpu", library, world, schedule_name, chunks)] = cpu.item()
                    except Exception as error:  # a library may not have, or refuse, a configuration
                        seconds = f"{type(error).__name__}: {str(error).splitlines()[0][:70]}"
                        dist.barrier()
                    if rank == 0:
                        results[(library, world, schedule_name, chunks)] = seconds
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
        seconds, _ = timed(lambda: (step(), torch.cuda.synchronize()), steps)
        print(f"  chunks {chunks}: {ids.numel() / seconds:,.0f} tokens/s ({seconds * 1e3:.0f} ms/step)")


def print_table(world: int, schedule_names, chunk_counts, reference: float, reference_cpu: float, micro_batched,
                results, cores: int) -> list:
    """One row per schedule and M; returns the rows' figures for the targets."""
    print(f"\n{world} processes on {cores} cores")
    print(f"{'M':>3} {'schedule':>16} {'torch_mp ms':>12} {'cpu ms':>7} {'busy':>5} {'cpu speedup':>11} {'speedup':>8} {'bound':>6} "
          f"{'cut bound':>10} {'bubble':>7} {'(p-1)/(M+p-1)':>14} {'pipelining ms':>14} {'ours/theirs':>12} "
          f"{'cpu ours/theirs':>16}")
    rows = []
    for chunks in chunk_counts:
        bound = min(world * chunks / (chunks + world - 1), cores)
        # The stages' compute as slow as micro-batching makes it (in CPU time, which the machine's
        # other work disturbs less than wall time): the cut step spread over p stages with the
        # bubble of p*M/(M+p-1), or over the cores when there are fewer.
        slower = micro_batched[chunks][1] / reference_cpu
        cut_bound = 1 / (slower * max((chunks + world - 1) / (chunks * world), 1 / cores))
        for schedule_name in schedule_names:
            ours = results[("torch_mp", world, schedule_name, chunks)]
            theirs = results.get(("pipelining", world, schedule_name, chunks))
            theirs_text = f"{theirs * 1e3:14.1f}" if isinstance(theirs, float) else f"  {theirs}"
            if not isinstance(ours, float):
                print(f"{chunks:>3} {schedule_name:>16}  n/a: {ours}")
                continue
            speedup = reference / ours
            ratio = f"{ours / theirs:12.2f}" if isinstance(theirs, float) else f"{'n/a':>12}"
            cpu = results[("cpu", "torch_mp", world, schedule_name, chunks)]
            their_cpu = results.get(("cpu", "pipelining", world, schedule_name, chunks))
            cpu_ratio = f"{cpu / their_cpu:16.2f}" if isinstance(their_cpu, float) else f"{'n/a':>16}"
            print(f"{chunks:>3} {schedule_name:>16} {ours * 1e3:12.1f} {cpu * 1e3:7.0f} {cpu / ours:5.2f} {reference_cpu / cpu:11.2f} "
                  f"{speedup:8.2f} "
                  f"{bound:6.2f} {cut_bound:10.2f} "
                  f"{1 - speedup / world:7.2f} {(world - 1) / (chunks + world - 1):14.2f} {theirs_text} {ratio} {cpu_ratio}")
            rows.append((chunks, schedule_name, speedup, cut_bound, ours / theirs if isinstance(theirs, float) else None))
    return rows


def print_targets(rows) -> None:
    """The targets on 2 processes: speedup >= 0.9x the cut bound at every M, >= 1.6x at the best
    M, step time <= 0.9x torch.distributed.pipelining's."""
    if not rows:
        return
    worst_cut = min(rows, key=lambda row: row[2] / row[3])
    best = max(rows, key=lambda row: row[2])
    ratios = [row for row in rows if row[4] is not None]
    print(f"\ntargets on 2 processes: speedup / cut bound >= 0.9 at every M: worst {worst_cut[2] / worst_cut[3]:.2f} "
          f"({worst_cut[1]}, M={worst_cut[0]}); best speedup >= 1.6: {best[2]:.2f} ({best[1]}, M={best[0]})"
          + (f"; ours/theirs <= 0.9: worst {max(row[4] for row in ratios):.2f}, median "
             f"{statistics.median(row[4] for row in ratios):.2f}" if ratios else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="process counts")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--gpu", action="store_true", help="also time the split GPT across cuda:0 and cpu")
    parser.add_argument("--timeline", metavar="DIR", help="draw one recorded step per torch_mp schedule into DIR")
    args = parser.parse_args()
    if args.timeline is not None:
        os.makedirs(args.timeline, exist_ok=True)
    cores = len(os.sched_getaffinity(0))

    reference, reference_cpu = dense_step_time(args.steps)
    micro_batched = {chunks: dense_step_time(args.steps, chunks) for chunks in args.chunks}
    print(f"MLP {DEPTH} x {WIDTH}, batch {BATCH}, fp32; one process, one thread: {reference * 1e3:.1f} ms/step "
          f"({reference_cpu * 1e3:.0f} ms CPU)")
    print("micro-batched one after another (the compute the stages do, cut), and per micro-batch: "
          + ", ".join(f"M={m} {t * 1e3:.0f} ms ({t / m * 1e3:.1f} ms each; CPU x{cpu / reference_cpu:.2f})"
                      for m, (t, cpu) in micro_batched.items()))
    results = {}
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
            shared = manager.dict()
            mp.spawn(_rank, args=(world, os.path.join(folder, "store"), args.schedules, args.chunks, args.steps,
                                  shared, args.timeline), nprocs=world)
            results.update(dict(shared))

    # Communication: each of the p*v - 1 stage boundaries carries M activations and M gradients
    # per step; their share is their time spread over the p processes, against 1F1B's step.
    print("\none micro-batch's activation between 2 processes (Gloo), and the messages' share of a 1F1B step:")
    for world in args.ranks:
        for chunks in args.chunks:
            seconds = results[("transfer", world, chunks)]
            step = results.get(("torch_mp", world, "1f1b", chunks))
            share = f", {2 * chunks * (world - 1) * seconds / world / step:.0%} of the step" \
                if isinstance(step, float) else ""
            print(f"  p={world} M={chunks}: {BATCH // chunks} x {WIDTH} fp32 in {seconds * 1e3:.2f} ms{share}")

    rows = {world: print_table(world, args.schedules, args.chunks, reference, reference_cpu, micro_batched, results,
                               cores)
            for world in args.ranks}
    print_targets(rows.get(2, []))
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device here")
        gpu_split_throughput(args.steps)


if __name__ == "__main__":
    main()
