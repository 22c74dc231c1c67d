"""Trains a tiny Llama (transformers config, random weights) on a pipeline x tensor x data parallel
mesh for a few steps, each rank holding its share within ``--max-memory``, and checks each step's
loss against the dense model's (trained on rank 0 on the whole batch).

    torchrun --nproc-per-node 8 examples/python/train_3d.py --pp 2 --tp 2 --dp 2
    torchrun --nproc-per-node 4 examples/python/train_3d.py --pp 2 --tp 2
    torchrun --nproc-per-node 4 examples/python/train_3d.py --pp 2 --tp 2 --schedule zbv --sequence-parallel

The order of the calls is torchtitan's: tensor parallel over mesh["tp"], then the pipeline over
mesh["pp"] with its replicas over mesh["dp"] (their gradients averaged after each step). Gloo on the
CPU by default.

Memory: the dense model's parameters and AdamW state (two fp32 copies) exceed ``--max-memory``
(default 1 MiB: the model is 0.69 MiB of parameters, 2.07 MiB with AdamW's state), the limit of one
device; each rank holds its stage's layers in its tensor-parallel shards (the embedding with the
first stage, the final norm and head with the last), their gradients and AdamW state, and must fit
it. No rank builds the whole model: rank 0 writes the dense weights to a safetensors file
(``--checkpoint``), every rank builds the model on the meta device (``torch_mp.init_empty_weights``),
shards it and reads only its share of the file (``torch_mp.load_full_state_dict``). The pipeline
settles each rank's share of the tensors outside the layers (embedding, final norm, head) in the
first step, so the script measures the bytes each rank holds after it (parameters, buffers,
gradients and AdamW state, tensor-parallel shards by their local size, other stages' meta stand-ins
not counted), prints them, and stops on every rank with an error naming the ranks over the limit.

Exits with an error when a step's loss differs from the dense model's (rtol 1e-5, atol 1e-6).
"""
import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

import torch_mp
from torch_mp._pipelining.cut import parse_bytes


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
    parser.add_argument("--checkpoint", default=None,
                        help="folder for the dense weights rank 0 writes and every rank reads its share of "
                             "(default: a temporary folder; on several nodes, one they share)")
    parser.add_argument("--max-memory", type=size, default="1MiB",
                        help="the most bytes one rank (device) may hold: parameters, buffers, gradients and AdamW "
                             "state (a byte count or e.g. '1MiB'; default 1MiB, less than the dense model needs)")
    return parser.parse_args()


def size(text: str) -> int:
    return parse_bytes(text, "--max-memory")


def llama(vocab: int, seq: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)  # the same model on every rank
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
                                      use_cache=False, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def nbytes(tensors) -> int:
    """Bytes of the tensors this rank holds: a DTensor by its local shard, meta stand-ins none."""
    held = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in held if not t.is_meta)


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """(parameters, buffers, gradients, optimizer state) bytes on this rank."""
    params = list(model.parameters())
    state = [t for entry in optimizer.state.values() for t in entry.values() if torch.is_tensor(t)]
    return (nbytes(params), nbytes(model.buffers()), nbytes(p.grad for p in params if p.grad is not None),
            nbytes(state))


def mib(value: int) -> str:
    return f"{value / 2**20:.3f}"


def check_memory(model, optimizer, mesh, limit: int, dense_bytes: int) -> None:
    """Every rank's held bytes, printed by rank 0; a SystemExit on every rank when one is over ``limit``."""
    rows = [None] * dist.get_world_size()
    coordinates = tuple(mesh[dim].get_local_rank() for dim in ("pp", "dp", "tp"))
    dist.all_gather_object(rows, (coordinates, held_bytes(model, optimizer)))
    if dist.get_rank() == 0:
        print(f"held per rank after the first step (MiB; max_memory {mib(limit)} MiB):")
        print(f"{'rank':>4} {'pp':>3} {'dp':>3} {'tp':>3} {'parameters':>11} {'buffers':>8} {'gradients':>10} "
              f"{'AdamW':>8} {'total':>8} {'of dense':>8}")
        for rank, ((pp, dp, tp), parts) in enumerate(rows):
            print(f"{rank:>4} {pp:>3} {dp:>3} {tp:>3} {mib(parts[0]):>11} {mib(parts[1]):>8} {mib(parts[2]):>10} "
                  f"{mib(parts[3]):>8} {mib(sum(parts)):>8} {sum(parts) / dense_bytes:>8.1%}")
    over = [(rank, sum(parts)) for rank, (_, parts) in enumerate(rows) if sum(parts) > limit]
    if over:
        raise SystemExit(f"train_3d: ranks {[rank for rank, _ in over]} hold "
                         f"{[f'{mib(held)} MiB' for _, held in over]} (parameters, buffers, gradients, AdamW "
                         f"state) after the first step; expected at most --max-memory {mib(limit)} MiB each: "
                         "raise --max-memory, or add pipeline or tensor-parallel ranks")
    if dist.get_rank() == 0:
        largest = max(sum(parts) for _, parts in rows)
        print(f"every rank within max_memory: largest {mib(largest)} MiB of {mib(limit)} MiB")


def main():
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = args.dp if args.dp is not None else world // (args.pp * args.tp)
    mesh = torch_mp.init_mesh(pp=args.pp, dp=dp, tp=args.tp)
    vocab = 256

    def loss_fn(output, ids):
        return F.cross_entropy(output.logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))

    # The reference: the dense model on rank 0 alone, its weights written for the others to read
    # their shares of, its loss sent to every rank each step.
    dense = llama(vocab, args.seq) if rank == 0 else None
    folder = [args.checkpoint or (tempfile.mkdtemp(prefix="train_3d-") if rank == 0 else None)]
    dist.broadcast_object_list(folder, src=0)
    if rank == 0:
        os.makedirs(folder[0], exist_ok=True)
        save_file({name: value.contiguous() for name, value in dense.state_dict().items()},
                  os.path.join(folder[0], "model.safetensors"))
    dist.barrier()
    with torch_mp.init_empty_weights():  # parameters on the meta device: no memory yet
        model = llama(vocab, args.seq)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    dense_bytes = 4 * parameters  # parameters, gradients, AdamW's two fp32 copies
    torch_mp.tensor_parallel(model, group=mesh["tp"], sequence_parallel=args.sequence_parallel)
    torch_mp.pipeline(model, group=mesh["pp"], data_parallel=mesh["dp"], chunks=args.chunks, schedule=args.schedule)
    torch_mp.load_full_state_dict(model, folder[0])  # this rank's stages' shards only
    dist.barrier()
    if rank == 0 and args.checkpoint is None:
        shutil.rmtree(folder[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dense_optimizer = torch.optim.AdamW(dense.parameters(), lr=1e-3) if rank == 0 else None
    replica = mesh["dp"].get_local_rank()
    if rank == 0:
        fits = "fits in" if 3 * parameters <= args.max_memory else "exceeds"
        print(f"dense model: parameters {mib(parameters)} MiB + AdamW state {mib(2 * parameters)} MiB = "
              f"{mib(3 * parameters)} MiB ({mib(dense_bytes)} MiB with gradients) {fits} "
              f"max_memory {mib(args.max_memory)} MiB")
        print(f"{world} ranks: pp={args.pp} x dp={dp} x tp={args.tp}, {args.schedule}, "
              f"sequence_parallel={args.sequence_parallel}")
        print(f"{'step':>4} {'mesh loss':>12} {'dense loss':>12}")
    generator = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch * dp, args.seq), generator=generator)  # the global batch
        mine = ids[args.batch * replica:args.batch * (replica + 1)]
        optimizer.zero_grad()
        loss = model.train_step(input_ids=mine, target=mine, loss_fn=loss_fn)
        torch_mp.clip_grad_norm_(model, 1.0)
        optimizer.step()
        expected = torch.zeros(())
        if rank == 0:
            dense_optimizer.zero_grad()
            expected = loss_fn(dense(input_ids=ids), ids)
            expected.backward()
            torch.nn.utils.clip_grad_norm_(dense.parameters(), 1.0)
            dense_optimizer.step()
            expected = expected.detach()
        dist.broadcast(expected, src=0)
        if rank == 0:
            print(f"{step:>4} {loss.item():>12.6f} {expected.item():>12.6f}")
        if not torch.allclose(loss.detach().double(), expected.double(), rtol=1e-5, atol=1e-6):
            raise SystemExit(f"train_3d: step {step}: the mesh's loss {loss.item()!r} differs from the dense "
                             f"model's {expected.item()!r} (rtol 1e-5, atol 1e-6)")
        if step == 0:
            check_memory(model, optimizer, mesh, args.max_memory, dense_bytes)
    if rank == 0:
        print(f"losses equal to the dense model's over {args.steps} steps (rtol 1e-5, atol 1e-6)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
