"""Soak: many training steps of a small tensor-parallel model on 2 Gloo ranks, watching each rank's
resident memory (RSS), which must not grow once the first steps have allocated what training needs.

    python bench/bench_soak.py [--steps 1000] [--warmup 100]

Prints, per rank, the RSS at start, after the warmup steps and at the end, and the drift per 100
steps after warmup: the least-squares slope of RSS sampled every 10 steps (one allocator burst then
does not decide it). The last line, RESULT {...}, is the same as JSON for tests to read.
"""
import argparse
import datetime
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from torch_mp.nn import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)

VOCAB, DIM, DEPTH, BATCH, SEQ = 512, 64, 2, 8, 32
SAMPLE_EVERY = 10


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Model(nn.Module):
    """Embedding, residual MLP blocks (column then row parallel), a vocabulary-parallel head."""

    def __init__(self):
        super().__init__()
        self.embedding = VocabParallelEmbedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(nn.Sequential(ColumnParallelLinear(DIM, 4 * DIM), nn.GELU(),
                                                  RowParallelLinear(4 * DIM, DIM)) for _ in range(DEPTH))
        self.head = ColumnParallelLinear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        for block in self.blocks:
            x = x + block(x)
        return vocab_parallel_cross_entropy(self.head(x), ids)


def soak(rank: int, world: int, folder: str, steps: int, warmup: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(folder, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = rss_mib()
    samples, losses = [], []
    for step in range(1, steps + 1):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ))  # fresh data every step, as training has
        loss = model(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % SAMPLE_EVERY == 0:
            losses.append(loss.item())
        if step >= warmup and (step - warmup) % SAMPLE_EVERY == 0:
            samples.append((step, rss_mib()))
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump({"start": start, "samples": samples, "first_loss": losses[0], "last_loss": losses[-1]}, handle)
    dist.destroy_process_group()


def slope_per_100(samples) -> float:
    steps = torch.tensor([s for s, _ in samples], dtype=torch.float64)
    rss = torch.tensor([r for _, r in samples], dtype=torch.float64)
    centered = steps - steps.mean()
    return float((centered * (rss - rss.mean())).sum() / (centered * centered).sum()) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=None, help="steps before RSS is tracked (default: 10%%)")
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else max(SAMPLE_EVERY, args.steps // 10)
    if args.steps < warmup + 2 * SAMPLE_EVERY:
        parser.error(f"--steps {args.steps} leaves fewer than 3 RSS samples after {warmup} warmup steps")
    world = 2
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(soak, args=(world, folder, args.steps, warmup), nprocs=world, start_method="spawn")
        reports = []
        for rank in range(world):
            with open(os.path.join(folder, f"rank{rank}.json")) as handle:
                reports.append(json.load(handle))
    print(f"soak: {args.steps} steps of a tensor-parallel MLP LM ({DEPTH} blocks, dim {DIM}, vocab {VOCAB}) "
          f"on {world} Gloo ranks, AdamW; RSS tracked after {warmup} warmup steps")
    print(f"{'rank':<6}{'start MiB':>11}{'warmup MiB':>12}{'end MiB':>10}{'end-warmup':>12}{'MiB/100 steps':>15}"
          f"{'loss':>16}")
    result = {"steps": args.steps, "warmup": warmup, "ranks": []}
    for rank, report in enumerate(reports):
        samples = report["samples"]
        after_warmup, end = samples[0][1], samples[-1][1]
        drift = slope_per_100(samples)
        print(f"{rank:<6}{report['start']:>11.1f}{after_warmup:>12.1f}{end:>10.1f}{end - after_warmup:>12.2f}"
              f"{drift:>15.3f}{report['first_loss']:>8.3f}->{report['last_loss']:.3f}")
        result["ranks"].append({"start_mib": report["start"], "after_warmup_mib": after_warmup, "end_mib": end,
                                "drift_mib_per_100_steps": drift})
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
