"""What model parallelism is for, in about two minutes on a CPU (`make demo` runs it).

    python examples/python/split_demo.py [--out build/demo] [--steps 60] [--devices cuda:0 cpu]

1. A GPT-2 (transformers, from a config) and a ``max_memory`` per device smaller than the model: one
   device cannot hold it, two can. ``torch_mp.split`` places it; the device map gives each module's
   device and ``torch_mp.state_of(model).stage_of`` its stage (the cut, where a device is named twice),
   ``torch_mp.memory_report`` the bytes per stage (a table, and a PNG with each device's limit).
2. Both models, split and unsplit, train on real text (this repository's README, byte-level tokens)
   from the same weights: their losses side by side, equal, going down.
3. The same GPT-2 pipelined over 2 processes (``torch_mp.pipeline``, Gloo, ``chunks=8``, one thread
   each) against 1 process with one thread: tokens/s of each and the speedup, measured in this run in
   wall time and in CPU time (which the machine's other work does not slow down: the wall figure is
   flagged when the load average exceeded the cores), and the timeline of one step as a PNG.

Devices default to cuda:0 and cpu where a GPU exists, else cpu twice (each stage boundary is still a
real copy through ``torch_mp.to_device``). Every file it writes lands in ``--out``.
"""
import argparse
import copy
import datetime
import os
import socket
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from torch.nn import functional as F
from tqdm import tqdm
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

import torch_mp

ROOT = Path(__file__).resolve().parents[2]
SEQ = 64


def gpt2_config() -> transformers.GPT2Config:
    # Byte-level tokens: a vocabulary of 256. No dropout, so split and unsplit runs draw no random
    # numbers and their losses can be compared exactly.
    return transformers.GPT2Config(
        vocab_size=256, n_positions=SEQ, n_embd=128, n_layer=8, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")


def make_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)  # the same weights in every process
    return transformers.GPT2LMHeadModel(gpt2_config())


def text_tokens() -> torch.Tensor:
    """This repository's README as bytes: a real text, about 30 KB, that every clone has."""
    return torch.tensor(list((ROOT / "README.md").read_bytes()), dtype=torch.long)


def batches(tokens: torch.Tensor, batch: int, seed: int):
    """Random windows of SEQ + 1 bytes: inputs and next-byte targets, ``(batch, SEQ)`` each."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - SEQ - 1, (batch,), generator=generator)
        windows = torch.stack([tokens[s:s + SEQ + 1] for s in starts.tolist()])
        yield windows[:, :-1], windows[:, 1:]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def output_loss(output: CausalLMOutputWithCrossAttentions, targets: torch.Tensor) -> torch.Tensor:
    """``train_step``'s loss_fn: the next-byte loss of one micro-batch's logits."""
    return next_token_loss(output.logits, targets)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def section(title: str) -> None:
    print(f"\n== {title} ==")


def split_part(args, out: Path):
    section("1. A GPT-2 that one device cannot hold")
    dense = make_gpt2()
    model_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    limit = int(model_bytes * 0.6)
    print(f"GPT-2 from a config: {gpt2_config().n_layer} blocks, {mib(model_bytes)} of parameters; "
          f"max_memory {mib(limit)} per device")
    try:
        torch_mp.split(copy.deepcopy(dense), args.devices[:1], max_memory=[limit])
        raise AssertionError("one device held a model larger than its max_memory")
    except ValueError as error:
        print(f"on one device ({args.devices[0]}): ValueError: {str(error).split(';')[0]}")
    split = torch_mp.split(copy.deepcopy(dense), args.devices, max_memory=[limit] * len(args.devices))
    print(f"on {len(args.devices)} devices {args.devices}: split. Device map (module: stage, device):")
    stage_of = torch_mp.state_of(split).stage_of
    for name, device in split.device_map.items():
        print(f"  {name:<22} stage {stage_of[name]}  {device}")
    report = torch_mp.memory_report(split)
    report.save_png(str(out / "memory_per_stage.png"), limits=[limit] * len(report.rows))
    print(report)
    return dense, split


def train_part(args, dense, split, out: Path) -> None:
    section("2. Training on real text: split and unsplit side by side")
    tokens = text_tokens()
    print(f"text: README.md, {len(tokens):,} bytes; batches of 16 x {SEQ} bytes; AdamW, lr 1e-3")
    dense_opt = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    split_opt = torch.optim.AdamW(split.parameters(), lr=1e-3)
    rows, worst = [], 0.0
    progress = tqdm(zip(range(args.steps), batches(tokens, 16, seed=1)), total=args.steps, desc="train", leave=False)
    for step, (ids, targets) in progress:
        losses = []
        for model, optimizer in ((dense, dense_opt), (split, split_opt)):
            logits = model(input_ids=ids).logits
            loss = next_token_loss(logits.to(targets.device), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        rows.append(losses)
        worst = max(worst, abs(losses[0] - losses[1]))
        progress.set_postfix(unsplit=f"{losses[0]:.4f}", split=f"{losses[1]:.4f}")
    print(f"{'step':>4}  {'unsplit loss':>12}  {'split loss':>12}")
    for step, (a, b) in enumerate(rows):
        if step % 5 == 0 or step == len(rows) - 1:
            print(f"{step:>4}  {a:>12.5f}  {b:>12.5f}")
    print(f"loss {rows[0][0]:.3f} -> {rows[-1][0]:.3f}; largest split/unsplit difference {worst:.2e}")
    if worst > 1e-4 or rows[-1][0] >= rows[0][0]:
        raise SystemExit("split and unsplit losses differ, or the loss did not go down")
    plot_losses(rows, out / "losses.png")


def plot_losses(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([a for a, _ in rows], label="unsplit", linewidth=3, alpha=0.5)
    axes.plot([b for _, b in rows], label="split", linestyle="--")
    axes.set(xlabel="step", ylabel="loss (nats per byte)", title="GPT-2 on README.md")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipeline_rank(rank: int, port: int, steps: int, batch: int, chunks: int, out: Path, results) -> None:
    """One of the 2 processes: one stage of the pipelined GPT-2, one thread. Rank 0 draws the
    timeline of the last step; each rank returns its wall and CPU seconds per step."""
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = torch_mp.pipeline(make_gpt2(), chunks=chunks, schedule="1f1b")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if not p.is_meta], lr=3e-3)
        losses, times, cpu_times = [], [], []
        data = batches(text_tokens(), batch, seed=2)
        for step in tqdm(range(steps + 1), desc="2 processes", leave=False, disable=rank != 0):
            ids, targets = next(data)
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = model.train_step(input_ids=ids, target=targets, loss_fn=output_loss, timeline=step == steps)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            losses.append(loss.item())
        if rank == 0:
            torch_mp.plot_timeline(model.last_timeline, out / "pipeline_timeline.png")
        results.put((rank, losses, times[1:], cpu_times[1:]))  # the first step warms up
    finally:
        dist.destroy_process_group()


def one_process(steps: int, batch: int):
    model = make_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, times, cpu_times = [], [], []
    data = batches(text_tokens(), batch, seed=2)
    for _ in tqdm(range(steps + 1), desc="1 process", leave=False):
        ids, targets = next(data)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = output_loss(model(input_ids=ids), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(loss.item())
    return losses, times[1:], cpu_times[1:]


def mean(values) -> float:
    return sum(values) / len(values)


def pipeline_part(args, out: Path) -> None:
    section("3. Devices working at once: a pipeline over 2 processes")
    # 16 sequences per micro-batch: enough work per action that the pipeline's own cost per
    # micro-batch (its messages, the stages' turns) stays a few percent of it.
    batch, chunks = 128, 8
    print(f"the same GPT2LMHeadModel, called as usual (input_ids=), cut into 2 stages by torch_mp.pipeline: "
          f"2 processes over Gloo, chunks={chunks}, 1F1B, one thread each; against 1 process, one thread; "
          f"batches of {batch} x {SEQ} bytes, {args.pipeline_steps} timed steps each")
    single_losses, single_times, single_cpu = one_process(args.pipeline_steps, batch)
    load = os.getloadavg()[0]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(pipeline_rank, args=(free_port(), args.pipeline_steps, batch, chunks, out, results),
                       nprocs=2, start_method="spawn")
    load = max(load, os.getloadavg()[0])
    ranks = dict((rank, rest) for rank, *rest in (results.get(), results.get()))
    piped_losses, piped_times, _ = ranks[0]
    tokens = batch * SEQ
    single_rate = tokens / mean(single_times)
    piped_rate = tokens / mean(piped_times)
    print(f"{'step':>4}  {'1 process loss':>14}  {'2 processes loss':>16}")
    for step, (a, b) in enumerate(zip(single_losses, piped_losses)):
        print(f"{step:>4}  {a:>14.5f}  {b:>16.5f}")
    worst = max(abs(a - b) for a, b in zip(single_losses, piped_losses))
    print(f"largest 1 process / 2 processes loss difference {worst:.2e}")
    if worst > 1e-4:
        raise SystemExit("the pipelined losses differ from one process's")
    bound = 2 * chunks / (chunks + 1)
    print(f"1 process:   {single_rate:>9,.0f} tokens/s, {mean(single_cpu):.2f} CPU s per step")
    print(f"2 processes: {piped_rate:>9,.0f} tokens/s, " + ", ".join(
        f"rank {rank} {mean(ranks[rank][2]):.2f} CPU s per step" for rank in (0, 1)))
    # In CPU time: the busier rank's CPU seconds per step stretched by the schedule's bubble (what a
    # step takes on 2 cores of its own), against one process's CPU seconds per step.
    busiest = max(mean(ranks[rank][2]) for rank in (0, 1))
    print(f"speedup {piped_rate / single_rate:.2f}x in wall time, {mean(single_cpu) / (busiest * 2 / bound):.2f}x in "
          f"CPU time (bound with 2 stages and {chunks} micro-batches: {bound:.2f}x)")
    cores = len(os.sched_getaffinity(0))
    if load > cores:
        print(f"the machine was busy: load average {load:.1f} on {cores} cores while the 2 processes needed 2 of "
              f"them: the wall-time figure measures the other work, the CPU-time figure the pipeline")
    print(f"timeline of the last step: {out / 'pipeline_timeline.png'}")


def main() -> None:
    default_devices = ["cuda:0", "cpu"] if torch.cuda.is_available() else ["cpu", "cpu"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=default_devices)
    parser.add_argument("--steps", type=int, default=60, help="training steps of part 2")
    parser.add_argument("--pipeline-steps", type=int, default=5, help="timed steps of part 3")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "demo", help="the folder of every file written")
    args = parser.parse_args()
    # transformers' notices about options of the config we chose (none are errors).
    transformers.logging.set_verbosity_error()
    # One thread per process: part 3 compares 1 process with 2 of one thread each, and a model this
    # small gains little from more threads while they slow it down many times on a busy machine.
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dense, split = split_part(args, args.out)
    train_part(args, dense, split, args.out)
    pipeline_part(args, args.out)
    print(f"\ndone in {time.perf_counter() - start:.0f} s; files written to {args.out}/: "
          f"{', '.join(sorted(os.listdir(args.out)))}")


if __name__ == "__main__":
    main()
