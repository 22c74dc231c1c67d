"""What drawing the dense model's dropout masks costs a tensor-parallel model, on 2 Gloo ranks (CPU,
one thread per rank).

    python bench/bench_tp_dropout.py [--steps 10] [--hidden 256] [--seq 256]

A GPT-2 (attn_pdrop = resid_pdrop = 0.1, 2 layers) under tensor_parallel: the eager forward+backward
step time with the dense masks (each rank draws the whole [batch, heads, seq, seq] mask and keeps its
heads; the forward of each attention and MLP under a dispatcher mode) against the same model with the
regions switched off (each rank draws only its own heads' mask: the wrong masks, the lower bound),
and against dropout off (p = 0).
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

import torch_mp
from torch_mp._tensor_parallel import dropout


def build(args, p):
    import transformers

    config = transformers.GPT2Config(vocab_size=512, n_positions=args.seq, n_embd=args.hidden, n_layer=2,
                                     n_head=8, attn_pdrop=p, resid_pdrop=p, embd_pdrop=p, use_cache=False)
    torch.manual_seed(0)
    return torch_mp.tensor_parallel(transformers.GPT2LMHeadModel(config).train())


def step_time(model, ids, steps):
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def worker(rank, world, folder, args):
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(folder, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(60))
    ids = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    dense_masks = step_time(build(args, 0.1), ids, args.steps)
    enter = dropout.DenseDropoutRegion.enter
    dropout.DenseDropoutRegion.enter = lambda self, module, a, k: self.modes.append(None)
    own_masks = step_time(build(args, 0.1), ids, args.steps)
    dropout.DenseDropoutRegion.enter = enter
    no_dropout = step_time(build(args, 0.0), ids, args.steps)
    if rank == 0:
        print(f"GPT-2 hidden {args.hidden}, seq {args.seq}, batch {args.batch}, 2 layers, {world} ranks; "
              f"step time (ms): dense masks {dense_masks * 1e3:.1f}, own masks {own_masks * 1e3:.1f} "
              f"(dense / own = {dense_masks / own_masks:.2f}), no dropout {no_dropout * 1e3:.1f}")
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(2, folder, args), nprocs=2)


if __name__ == "__main__":
    main()
