"""Trains a small GPT as a pipeline: micro-batches flowing through stages that work at once.

    python examples/python/pipeline_train.py                       # one process, a thread per micro-batch
    torchrun --nproc-per-node 2 examples/python/pipeline_train.py  # one stage per rank (Gloo on CPU)

The task is learnable from scratch (each token is followed by the next in a cycle), so the loss
falls within a few dozen steps. Options: --chunks, --schedule (gpipe, 1f1b, interleaved_1f1b under
torchrun), --checkpoint (never, except_last, always), --steps, --balance (auto, time).
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

import torch_mp


class GPT(nn.Module):
    def __init__(self, vocab: int = 128, dim: int = 128, heads: int = 4, depth: int = 8, context: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(seq, device=ids.device))
        causal = torch.full((seq, seq), float("-inf"), device=ids.device).triu(1)
        for block in self.blocks:
            x = block(x, src_mask=causal)
        return self.head(self.norm(x))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def batches(batch: int, seq: int, vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, vocab, (batch, 1), generator=generator)
        tokens = (start + torch.arange(seq + 1)) % vocab
        yield tokens[:, :-1], tokens[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--checkpoint", default="never")
    parser.add_argument("--balance", default="auto")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same initial weights on every rank
    model = GPT()
    ids, targets = next(batches(args.batch, 64, 128, seed=0))
    sample = (ids,) if args.balance == "time" else None
    if distributed:
        model = torch_mp.pipeline(model, chunks=args.chunks, schedule=args.schedule, checkpoint=args.checkpoint,
                                  balance=args.balance, sample=sample)
        rank, world = dist.get_rank(), dist.get_world_size()  # stage s runs on rank s % world
        mine = sorted({stage for stage in torch_mp.state_of(model).stage_of.values() if stage % world == rank})
        where = f"rank {rank} of {world}, stages {mine}"
    else:
        model = torch_mp.split(model, ["cpu", "cpu"], chunks=args.chunks, schedule=args.schedule,
                               checkpoint=args.checkpoint, balance=args.balance, sample=sample)
        where = "one process, stages " + ", ".join(sorted({str(s) for s in torch_mp.state_of(model).stage_of.values()}))
    leader = not distributed or dist.get_rank() == 0
    if leader:
        print(f"pipeline: {where}; chunks {args.chunks}, schedule {args.schedule}, checkpoint {args.checkpoint}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if not p.is_meta], lr=3e-3)
    progress = tqdm(range(args.steps), disable=not leader, desc="train")
    first = last = None
    for _, (ids, targets) in zip(progress, batches(args.batch, 64, 128, seed=1)):
        start = time.perf_counter()
        loss = model.train_step(ids, target=targets, loss_fn=next_token_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
        last = loss.item()
        progress.set_postfix(loss=f"{last:.3f}", tokens_per_s=f"{ids.numel() / (time.perf_counter() - start):,.0f}")
    if leader:
        print(f"loss {first:.3f} -> {last:.3f}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
