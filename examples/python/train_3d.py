"""Trains a tiny Llama (transformers config, random weights) on a pipeline x tensor x data parallel
mesh for a few steps, and prints each step's loss next to the dense model's, trained in the same
processes on the whole batch.

    torchrun --nproc-per-node 8 examples/python/train_3d.py --pp 2 --tp 2 --dp 2
    torchrun --nproc-per-node 4 examples/python/train_3d.py --pp 2 --tp 2
    torchrun --nproc-per-node 4 examples/python/train_3d.py --pp 2 --tp 2 --schedule zbv --sequence-parallel

The order of the calls is torchtitan's: tensor parallel over mesh["tp"], then the pipeline over
mesh["pp"] with its replicas over mesh["dp"] (their gradients averaged after each step). Gloo on the
CPU by default.
"""
import argparse

import torch
import torch.distributed as dist
import transformers
from torch.nn import functional as F

import torch_mp


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2, help="pipeline ranks")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks")
    parser.add_argument("--dp", type=int, default=None, help="data-parallel replicas (default: the rest)")
    parser.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b", "zb_h1", "zbv"])
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--chunks", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="sequences per data-parallel replica")
    parser.add_argument("--seq", type=int, default=32)
    return parser.parse_args()


def llama(vocab: int, seq: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)  # the same model on every rank
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
                                      use_cache=False, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def main():
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = args.dp if args.dp is not None else world // (args.pp * args.tp)
    mesh = torch_mp.init_mesh(pp=args.pp, dp=dp, tp=args.tp)
    vocab = 256

    def loss_fn(output, ids):
        return F.cross_entropy(output.logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))

    dense = llama(vocab, args.seq)
    model = torch_mp.tensor_parallel(llama(vocab, args.seq), group=mesh["tp"], sequence_parallel=args.sequence_parallel)
    torch_mp.pipeline(model, group=mesh["pp"], data_parallel=mesh["dp"], chunks=args.chunks, schedule=args.schedule)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, dense)]
    replica = mesh["dp"].get_local_rank()
    if rank == 0:
        print(f"{world} ranks: pp={args.pp} x dp={dp} x tp={args.tp}, {args.schedule}, "
              f"sequence_parallel={args.sequence_parallel}")
        print(f"{'step':>4} {'mesh loss':>12} {'dense loss':>12}")
    generator = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch * dp, args.seq), generator=generator)  # the global batch
        mine = ids[args.batch * replica:args.batch * (replica + 1)]
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss = model.train_step(input_ids=mine, target=mine, loss_fn=loss_fn)
        torch_mp.clip_grad_norm_(model, 1.0)
        optimizers[0].step()
        expected = loss_fn(dense(input_ids=ids), ids)
        expected.backward()
        torch.nn.utils.clip_grad_norm_(dense.parameters(), 1.0)
        optimizers[1].step()
        if rank == 0:
            print(f"{step:>4} {loss.item():>12.6f} {expected.item():>12.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
