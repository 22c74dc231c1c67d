"""Trains a small GPT-2 (built from a config, random weights) with tensor parallelism, data
parallelism on top, and torch.compile; prints loss and tokens/s and saves a stock checkpoint.

    torchrun --nproc-per-node 2 examples/python/train_compile.py --tp 2 --compile
    torchrun --nproc-per-node 4 examples/python/train_compile.py --tp 2 --dp 2 --compile
    torchrun --nproc-per-node 8 examples/python/train_compile.py --tp 8 --compile --backend nccl   # GPUs

The checkpoint (--save, safetensors) has the stock names and shapes: GPT2LMHeadModel loads it as is.
--checkpoint DIR saves a torch_mp checkpoint (model, optimizer, random state) to resume from with
--resume, at any tensor-parallel size:

    torchrun --nproc-per-node 2 examples/python/train_compile.py --tp 2 --steps 10 --checkpoint ckpt
    torchrun --nproc-per-node 2 examples/python/train_compile.py --tp 2 --steps 20 --checkpoint ckpt --resume
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import transformers
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import torch_mp


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: all)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the model and loss")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="sequences per data-parallel replica")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--save", default=None, help="where to save the stock checkpoint (.safetensors)")
    parser.add_argument("--checkpoint", default=None, help="a torch_mp checkpoint folder, saved after training")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint up to --steps")
    args = parser.parse_args()
    if args.resume and not args.checkpoint:
        parser.error("--resume needs --checkpoint, the folder to resume from")
    return args


def main():
    args = parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = torch_mp.init_mesh(dp=args.dp, tp=args.tp)
    dp_rank = mesh["dp"].get_local_rank()

    torch.manual_seed(0)  # the same initial model on every rank
    config = transformers.GPT2Config(vocab_size=512, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                                     n_head=8, use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).to(device)
    torch_mp.tensor_parallel(model, group=mesh["tp"])
    sharded = model
    if args.dp > 1:
        with torch_mp.local_parameters(model):  # DDP needs plain tensors; the DTensors are back after
            model = DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    report = torch_mp.memory_report(sharded)  # a collective: every rank takes part
    if rank == 0:
        print(f"{world} ranks: tp={mesh['tp'].size()} x dp={args.dp}, compile={args.compile}\n{report}")

    def loss_of(ids):
        logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    step_loss = torch.compile(loss_of, fullgraph=True) if args.compile else loss_of
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    first_step = 0
    if args.resume:
        first_step = torch_mp.load(sharded, args.checkpoint, optimizer=optimizer)["step"]
        if first_step >= args.steps:
            raise SystemExit(f"--resume: {args.checkpoint} is at step {first_step}; expected --steps above it")
    progress = _progress_bar(args.steps - first_step, rank)
    tokens_per_step = args.batch * args.seq * args.dp
    start = None
    for step in range(first_step, args.steps):
        # Tensor-parallel ranks of one replica see the same batch; replicas see different ones. A
        # generator per step gives a resumed run the batches the uninterrupted one would have seen.
        data = torch.Generator().manual_seed(1000 + 100_003 * dp_rank + step)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=data).to(device)
        loss = step_loss(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if step == first_step:
            start = time.perf_counter()  # the first step compiles: rate from the second on
        rate = tokens_per_step * (step - first_step) / (time.perf_counter() - start) if step > first_step else 0.0
        progress(step - first_step, value, rate)
    if rank == 0:
        print(f"final loss {value:.4f}, {rate:.0f} tokens/s")

    if args.checkpoint:
        torch_mp.save(sharded, args.checkpoint, optimizer=optimizer, extra={"step": args.steps})
        if rank == 0:
            print(f"saved a torch_mp checkpoint at step {args.steps} to {args.checkpoint}")
    state = torch_mp.full_state_dict(sharded)  # a collective: stock names and shapes on every rank
    if args.save and rank == 0:
        from safetensors.torch import save_file

        save_file(state, args.save)
        print(f"saved a stock checkpoint to {args.save}")
    dist.destroy_process_group()


def _progress_bar(steps, rank):
    if rank != 0:
        return lambda step, loss, rate: None
    from tqdm import tqdm

    bar = tqdm(total=steps, desc="training", mininterval=0.5)

    def update(step, loss, rate):
        bar.set_postfix(loss=f"{loss:.4f}", tokens_per_s=f"{rate:.0f}")
        bar.update(1)
        if step == steps - 1:
            bar.close()

    return update


if __name__ == "__main__":
    main()
