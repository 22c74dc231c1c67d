"""The training job of the multi-node test (tests/multinode/run.py starts it with torchrun on each
"node"), and the single-process dense run it is compared with.

    torchrun ... train.py tp_dp    --out DIR [--checkpoint DIR]   # 4 ranks: tp=2 across the nodes, dp=2
    torchrun ... train.py pipeline --out DIR                      # 2 ranks: one pipeline stage per node
    torchrun ... train.py pp_tp    --out DIR [--checkpoint DIR]   # 4 ranks: pp=2 across the nodes, tp=2 inside
    python train.py dense --out DIR                               # both, in one process, no parallelism

Each run appends one line per step to DIR/<scenario>.losses: "step loss" with the loss written
exactly (float.hex), the loss of the whole batch (averaged over the data-parallel replicas).

tp_dp and pp_tp with --checkpoint save with torch_mp.save every 2 steps and resume from the last save when
started again (torchrun --max-restarts). With TORCH_MP_TEST_KILL_STEP=K set on a node, that node
stops in the middle of step K's forward, once, each rank writing DIR/dying-rank<R>.json; run.py then
kills every process of the node. The survivors raise torch_mp.CollectiveError within the group's timeout, write
DIR/error-rank<R>.json and exit.
"""
import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import torch_mp

STEPS, SEQ, BATCH, DP = 6, 32, 4, 2
GROUP_TIMEOUT = 10.0  # seconds: how long survivors wait for a dead node


def make_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=64, n_layer=4, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(config)


def batch(step: int, replica: int):
    """Replica ``replica``'s inputs and next-token targets at ``step``, ``(BATCH, SEQ)`` each: the
    same wherever and whenever (after a restart) they are drawn."""
    generator = torch.Generator().manual_seed(1000 + 100_003 * replica + step)
    tokens = torch.randint(0, 256, (BATCH, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def record(out: Path, scenario: str, step: int, loss: float) -> None:
    with open(out / f"{scenario}.losses", "a") as f:
        f.write(f"{step} {loss.hex()}\n")


def dense(out: Path) -> None:
    """Single process: the full batch (every replica's rows) through the unsplit model."""
    model = make_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(STEPS):
        parts = [batch(step, replica) for replica in range(DP)]
        ids, targets = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        loss = loss_fn(model(input_ids=ids).logits, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record(out, "dense", step, loss.item())


def stop_mid_step(model: torch.nn.Module, out: Path, step_of) -> None:
    """On the node told to, at step TORCH_MP_TEST_KILL_STEP, once (not on the node that replaces it):
    every rank of the node stops answering in the middle of the forward, writing dying-rank<R>.json;
    run.py then kills the node."""
    kill_step = os.environ.get("TORCH_MP_TEST_KILL_STEP")
    if kill_step is None or any(out.glob("dying-rank*.json")):
        return

    def hook(module, args):
        if step_of() == int(kill_step):
            (out / f"dying-rank{dist.get_rank()}.json").write_text(json.dumps({"time": time.time()}))
            time.sleep(3600)

    model.transformer.h[len(model.transformer.h) // 2].register_forward_pre_hook(hook)


def tp_dp(out: Path, checkpoint) -> None:
    """4 ranks: tensor parallel across the two nodes (ranks r and r + 2), data parallel (DDP) inside
    each node, so torch_mp's collectives cross the network."""
    if dist.get_world_size() != 4:
        raise SystemExit(f"tp_dp: expected 4 ranks (2 nodes x 2), got {dist.get_world_size()}")
    mesh = init_device_mesh("cpu", (2, DP), mesh_dim_names=("tp", "dp"))
    replica = mesh["dp"].get_local_rank()
    model = make_gpt2()
    torch_mp.tensor_parallel(model, group=mesh["tp"])
    sharded = model
    with torch_mp.local_parameters(model):  # DDP needs plain tensors; the DTensors are back after
        model = DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = resume(sharded, optimizer, checkpoint)
    step = first
    stop_mid_step(sharded, out, lambda: step)
    for step in range(first, STEPS):
        ids, targets = batch(step, replica)
        try:
            loss = loss_fn(model(input_ids=ids).logits, targets)
            loss.backward()
        except torch_mp.CollectiveError as error:
            report_error(out, error)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh["dp"].get_group())
        if dist.get_rank() == 0:
            record(out, "tp_dp", step, mean.item() / DP)
        save_every_2(sharded, optimizer, checkpoint, step)


def resume(model: torch.nn.Module, optimizer, checkpoint) -> int:
    """The step to start at: 0, or the one saved in ``checkpoint`` (model and optimizer loaded)."""
    if checkpoint and (Path(checkpoint) / "torch_mp_checkpoint.json").exists():
        return torch_mp.load(model, checkpoint, optimizer=optimizer)["step"]
    return 0


def save_every_2(model: torch.nn.Module, optimizer, checkpoint, step: int) -> None:
    if checkpoint and (step + 1) % 2 == 0:
        torch_mp.save(model, checkpoint, optimizer=optimizer, extra={"step": step + 1})


def report_error(out: Path, error: Exception) -> None:
    """A survivor: how long after the node stopped answering the error came, then the end of this
    process (the group is unusable; torchrun restarts the workers)."""
    stopped = max(json.loads(path.read_text())["time"] for path in out.glob("dying-rank*.json"))
    (out / f"error-rank{dist.get_rank()}.json").write_text(json.dumps({
        "type": type(error).__name__, "message": str(error), "after_s": time.time() - stopped,
        "timeout_s": GROUP_TIMEOUT}))
    os._exit(1)


def pipeline(out: Path) -> None:
    """2 ranks, one per node: a 2-stage pipeline of the GPT-2, micro-batches crossing the network."""
    model = torch_mp.pipeline(make_gpt2(), chunks=4, schedule="1f1b")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if not p.is_meta], lr=1e-3)
    for step in range(STEPS):
        parts = [batch(step, replica) for replica in range(DP)]
        ids, targets = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        loss = model.train_step(input_ids=ids, target=targets, loss_fn=lambda output, t: loss_fn(output.logits, t))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.get_rank() == 0:
            record(out, "pipeline", step, loss.item())


def pp_tp(out: Path, checkpoint) -> None:
    """4 ranks: a 2-stage pipeline across the nodes (stage 0 on ranks 0 and 1, stage 1 on 2 and 3),
    each stage tensor parallel over its node's two ranks (init_mesh(pp=2, tp=2)): the TP collectives
    stay inside a node, the micro-batches' activations and gradients cross the veth link."""
    if dist.get_world_size() != 4:
        raise SystemExit(f"pp_tp: expected 4 ranks (2 nodes x 2), got {dist.get_world_size()}")
    mesh = torch_mp.init_mesh(pp=2, tp=2)
    model = torch_mp.tensor_parallel(make_gpt2(), group=mesh["tp"])
    torch_mp.pipeline(model, group=mesh["pp"], chunks=4, schedule="1f1b")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = resume(model, optimizer, checkpoint)
    step = first
    stop_mid_step(model, out, lambda: step)
    for step in range(first, STEPS):
        parts = [batch(step, replica) for replica in range(DP)]
        ids, targets = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        try:
            loss = model.train_step(input_ids=ids, target=targets,
                                    loss_fn=lambda output, t: loss_fn(output.logits, t))
        except torch_mp.CollectiveError as error:
            report_error(out, error)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.get_rank() == 0:
            record(out, "pp_tp", step, loss.item())
        save_every_2(model, optimizer, checkpoint, step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["tp_dp", "pipeline", "pp_tp", "dense"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    if args.scenario == "dense":
        return dense(args.out)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
    try:
        if args.scenario == "pipeline":
            pipeline(args.out)
        else:
            {"tp_dp": tp_dp, "pp_tp": pp_tp}[args.scenario](args.out, args.checkpoint)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
