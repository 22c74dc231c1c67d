"""A pipelined Llama on this machine's CPU cores: what each rank holds, and its step time against
torch.distributed.pipelining with hand-cut stages, measured in one run.

    python bench/bench_pipeline_llm.py [--ranks 2 4] [--steps 3] [--quick]

The model: transformers' LlamaForCausalLM, vocab 32000, hidden 512, 8 layers (intermediate 1200:
56M parameters), random weights, fp32; batch 8 x 128 tokens in 4 micro-batches, 1F1B, on p
processes (Gloo, one thread each). For each p:

- theirs: ``PipelineStage`` + ``Schedule1F1B`` on stages cut by hand, the layers evenly, the
  embedding with the first, the final norm and head with the last; ours: ``torch_mp.pipeline``
  with its default cut (even parameter bytes: the same layers per stage here), and with
  ``balance="time"`` (the layers cut by their measured time, the head's counted with the last
  stage: a 32000-word head costs more than 4 of these layers, so the last stage runs fewer);
- layers: the stage's decoder layers; held / ideal: the parameters a rank holds over the
  model's / p (the largest stage's rank is the figure that matters: target <= 1.05, met by the
  even cut; the time cut trades it for step time);
- RSS MiB: each rank's resident memory after the timed steps, and its peak (which includes
  building the whole model on every rank before the cut, for both);
- step ms and /theirs: the median step time, and ours over theirs (target <= 0.9). With the same
  cut both run the same kernels and the last stage (4 layers and the head) is busy the whole
  step: the bound is 1.0; the time cut shortens the slowest stage.

Then the same at 32 layers (hidden 256): every rank runs the model's whole forward per
micro-batch, other ranks' layers as meta stand-ins; what the stand-ins cost per micro-batch (their
Python time, measured by timing each stand-in call) and the share of the step it takes.

``--quick``: 2 processes, 2 steps, no 32-layer run. The machine's load average is printed with the
figures: other work on the cores slows the step times of both libraries alike, but not evenly.
"""
import argparse
import datetime
import os
import re
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import torch_mp

VOCAB, BATCH, TOKENS, CHUNKS = 32000, 8, 128, 4


def make_model(layers: int, hidden: int) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 75 // 32,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=TOKENS, tie_word_embeddings=False,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


def make_batch():
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator),
            torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator))


def _loss(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


class _Stage(nn.Module):
    """Layers ``first``..``last`` of the Llama, with the embedding on stage 0 and the final norm and
    head on the last stage: a hand-cut stage for torch.distributed.pipelining."""

    def __init__(self, model: nn.Module, first: int, last: int, is_first: bool, is_last: bool):
        super().__init__()
        self.embed = model.model.embed_tokens if is_first else None
        self.layers = nn.ModuleList(model.model.layers[first:last])
        self.rotary = model.model.rotary_emb
        self.norm, self.head = (model.model.norm, model.lm_head) if is_last else (None, None)

    def forward(self, x):
        hidden = self.embed(x) if self.embed is not None else x
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        embeddings = self.rotary(hidden, positions)
        for layer in self.layers:
            hidden = layer(hidden, position_ids=positions, position_embeddings=embeddings)
        return self.head(self.norm(hidden)) if self.head is not None else hidden


def _theirs(model: nn.Module, rank: int, world: int):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    per = len(model.model.layers) // world
    stage = _Stage(model, rank * per, (rank + 1) * per, rank == 0, rank == world - 1)
    pipe = Schedule1F1B(PipelineStage(stage, rank, world, torch.device("cpu")), n_microbatches=CHUNKS,
                        loss_fn=_loss)
    ids, target = make_batch()

    def step():
        if rank == 0:
            pipe.step(ids)
        elif rank == world - 1:
            pipe.step(target=target, losses=[])
        else:
            pipe.step()
        stage.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in stage.parameters()), [per] * world


def _ours(model: nn.Module, rank: int, world: int, balance: str = "auto"):
    ids, target = make_batch()
    # balance="time": the layers cut by their forward+backward time measured on one micro-batch,
    # the embedding's with the first stage and the head's (a 32000-word projection: more than a
    # layer) with the last.
    sample = {"input_ids": ids[:BATCH // CHUNKS], "use_cache": False} if balance == "time" else None
    piped = torch_mp.pipeline(model, chunks=CHUNKS, schedule="1f1b", balance=balance, sample=sample)

    def step():
        # use_cache=False: a KV cache the model would make per micro-batch is no plain argument, so
        # the stand-ins would run every layer on meta again for each call instead of replaying it.
        piped.train_step(ids, use_cache=False, target=target, loss_fn=lambda out, t: _loss(out.logits, t))
        piped.zero_grad(set_to_none=True)

    step()  # the first call places the tensors outside the layers
    layers = torch_mp.state_of(piped).stage_of
    counts = [sum(1 for name, stage in layers.items() if re.fullmatch(r"model\.layers\.\d+", name) and stage == s)
              for s in range(world)]
    return step, sum(p.numel() for p in piped.parameters() if not p.is_meta), counts


def _memory() -> tuple:
    """This process's resident MiB now and at its peak."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _StandInClock:
    """Times every stand-in call (another rank's module run on meta tensors) of this process."""

    def __init__(self):
        from torch_mp._pipelining import engine

        self.seconds, self.calls, self.engine = 0.0, 0, engine
        original = self.original = engine._StandIn.call

        def call(stand_in, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(stand_in, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        engine._StandIn.call = call


def _rank(rank: int, world: int, store: str, library: str, layers: int, hidden: int, steps: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        model = make_model(layers, hidden)
        total = sum(p.numel() for p in model.parameters())
        clock = _StandInClock() if library == "stand-ins" else None
        step, held, counts = (_theirs(model, rank, world) if library == "theirs"
                              else _ours(model, rank, world, "time" if library == "ours, balance='time'" else "auto"))
        step()  # warm-up
        dist.barrier()
        if clock is not None:
            clock.seconds, clock.calls = 0.0, 0
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            dist.barrier()
            times.append(time.perf_counter() - start)
        results[(library, world, layers, rank)] = dict(
            held=held, total=total, step=statistics.median(times), rss=_memory(), counts=counts,
            stand_ins=(clock.seconds / steps, clock.calls / steps) if clock is not None else None)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, library: str, layers: int, hidden: int, steps: int) -> dict:
    """Each rank's figures; none where a process failed (its error is printed)."""
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        shared = manager.dict()
        try:
            mp.spawn(_rank, args=(world, os.path.join(folder, "store"), library, layers, hidden, steps, shared),
                     nprocs=world)
        except Exception as error:  # noqa: BLE001 - a library failing one configuration: the others run on
            print(f"   {library} on {world} processes failed: {str(error).strip().splitlines()[0]}")
            return {}
        return dict(shared)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="process counts")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 processes, 2 steps, no 32-layer run")
    args = parser.parse_args()
    ranks, steps = ([2], 2) if args.quick else (args.ranks, args.steps)
    print(f"load average before: {open('/proc/loadavg').read().strip()}; "
          f"{len(os.sched_getaffinity(0))} cores for {max(ranks)} processes")
    total = sum(p.numel() for p in make_model(8, 512).parameters())
    print(f"Llama vocab {VOCAB}, hidden 512, 8 layers: {total / 1e6:.1f}M parameters; batch {BATCH} x {TOKENS}, "
          f"{CHUNKS} micro-batches, 1F1B, fp32, one thread per process")
    libraries = ["theirs", "ours", "ours, balance='time'"]
    print(f"{'p':>2} {'library':<22} {'rank':>4} {'layers':>6} {'held/ideal':>10} {'RSS MiB':>8} {'(peak)':>7} "
          f"{'step ms':>8} {'/theirs':>8}")
    for world in ranks:
        results = {}
        for library in libraries:
            results.update(_spawn(world, library, 8, 512, steps))
        ideal = total / world
        theirs = results.get(("theirs", world, 8, 0))
        for library in libraries:
            for rank in range(world):
                entry = results.get((library, world, 8, rank))
                if entry is None:
                    continue
                ratio = f"{entry['step'] / theirs['step']:8.2f}" if theirs else f"{'n/a':>8}"
                print(f"{world:>2} {library:<22} {rank:>4} {entry['counts'][rank]:>6} {entry['held'] / ideal:10.2f} "
                      f"{entry['rss'][0]:8.0f} {entry['rss'][1]:7.0f} {entry['step'] * 1e3:8.0f} {ratio}")
        for library in libraries[1:]:
            if (library, world, 8, 0) not in results:
                continue
            largest = max(results[(library, world, 8, r)]["held"] for r in range(world)) / ideal
            ratio = f"{results[(library, world, 8, 0)]['step'] / theirs['step']:.2f}" if theirs else "n/a"
            print(f"   p={world}, {library}: largest stage held/ideal {largest:.2f} (target <= 1.05); step "
                  f"ours/theirs {ratio} (target <= 0.9)")
        print(f"   load average {open('/proc/loadavg').read().split()[0]}")
    if not args.quick:
        world = max(ranks)
        results = _spawn(world, "stand-ins", 32, 256, steps)
        print(f"\n32 layers, hidden 256, {world} processes: the stand-ins of other ranks' layers per micro-batch")
        for rank in sorted(key[3] for key in results):
            entry = results[("stand-ins", world, 32, rank)]
            seconds, calls = entry["stand_ins"]
            print(f"  rank {rank}: {seconds / CHUNKS * 1e3:.2f} ms per micro-batch ({calls / CHUNKS:.0f} calls), "
                  f"{seconds / entry['step']:.1%} of the step ({entry['step'] * 1e3:.0f} ms)")
    print(f"load average after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
