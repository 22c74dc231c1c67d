"""Trains an MLP whose weights are split across ranks (tensor parallel) next to the dense MLP, and
prints both losses: they agree step for step.

    torchrun --nproc-per-node 2 examples/python/tensor_parallel_mlp.py          # Gloo, CPU
    torchrun --nproc-per-node 2 examples/python/tensor_parallel_mlp.py --nccl   # NCCL, one GPU a rank
"""
import argparse
import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from torch_mp.nn import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nccl", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    dist.init_process_group("nccl" if args.nccl else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if args.nccl else torch.device("cpu")

    torch.manual_seed(0)  # the same dense model and data on every rank
    dense = MLP(64).to(device)
    parallel = copy.deepcopy(dense)
    parallel.up = ColumnParallelLinear.from_dense(parallel.up)      # this rank's output features
    parallel.down = RowParallelLinear.from_dense(parallel.down)     # this rank's input features
    x = torch.randn(32, 64, device=device)
    target = torch.sin(x)

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (dense, parallel)]
    if rank == 0:
        print(f"{world} ranks; up weight per rank {tuple(parallel.up.weight.shape)} of {tuple(dense.up.weight.shape)}")
    for step in range(args.steps):
        losses = []
        for model, optimizer in zip((dense, parallel), optimizers):
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if rank == 0:
            print(f"step {step}: dense {losses[0]:.6f}  tensor parallel {losses[1]:.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
