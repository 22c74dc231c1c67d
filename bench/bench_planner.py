"""torch_mp.plan against running every candidate: for an MLP stack, a tiny Llama and a tiny Mixtral
on 4 Gloo processes (one thread each), every layout the planner enumerates is applied with
``torch_mp.parallelize`` and run for a few steps (train_step, then an AdamW step); then, for two
memory limits each, the planner's pick is compared with the best measured layout among those it
says fit.

    python bench/bench_planner.py [--steps 3] [--models mlp llama mixtral] [--max-chunks 4] [--quick]

Printed per model: each layout's predicted / measured step time (the median of ``--steps`` timed
``train_step`` calls, the slowest rank's; target within 25% on this noisy CPU) and predicted /
measured peak memory per rank (the tensors held at the peak of one more ``train_step``: the
parameters and AdamW's state held before it plus the rise ``torch_mp.measure_peak`` counts, what
``memory_report(costs=, sample=)`` predicts; the resident set also holds the pages glibc keeps of
freed blocks, 8-13 MiB here; the largest rank's; target within 10%); then for each limit the pick, the best measured layout that the planner
says fits, pick / best (target <= 1.10) and the layouts the planner said fit that went over the limit
(target: none). The cost table is measured once on the 4 ranks at once (so it includes what they
take from each other on the shared cores), as ``torch_mp.plan(..., sample=)`` does.

``--quick``: the MLP only, up to 2 micro-batches, 2 steps.
"""
import argparse
import datetime
import gc
import os
import pickle
import statistics
import sys
import tempfile
import time

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import torch_mp  # noqa: E402
from torch_mp._planner.costs import measure_costs  # noqa: E402
from torch_mp._planner.model import peak_bytes, step_seconds  # noqa: E402
from torch_mp._planner.plans import Candidate, Plan  # noqa: E402
from torch_mp._planner.search import layouts  # noqa: E402

WORLD = 4
VOCAB = 2048
SEQ = 32


class Block(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.up = nn.Linear(width, inner)
        self.down = nn.Linear(inner, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(*[Block(512, 2048) for _ in range(8)])
    import transformers
    common = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=1,
                  pad_token_id=0, use_cache=False)
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(intermediate_size=768, **common))
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        intermediate_size=256, num_local_experts=4, num_experts_per_tok=2, **common))


def batch_of(name: str, rows: int):
    """(inputs as a dict, target, loss_fn)"""
    generator = torch.Generator().manual_seed(1)
    if name == "mlp":
        x = torch.randn(rows, 512, generator=generator)
        return {"input": x}, torch.randn(rows, 512, generator=generator), F.mse_loss
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=generator)

    def loss_fn(output, target):
        return F.cross_entropy(output.logits[:, :-1].reshape(-1, VOCAB), target[:, 1:].reshape(-1))
    return {"input_ids": ids}, ids, loss_fn


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors
               if not t.is_meta)


def _run_layout(name, costs, layout, rows, steps):
    gc.collect()
    model = build(name)
    candidate = Candidate(layout, step_seconds(costs, layout), tuple(peak_bytes(costs, layout)))
    model = torch_mp.parallelize(model, Plan(WORLD, 2**62, rows, candidate, (), (), costs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if not p.is_meta], lr=1e-4)
    inputs, target, loss_fn = batch_of(name, rows)
    times = []
    for step in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        model.train_step(**inputs, target=target, loss_fn=loss_fn)
        times.append(time.perf_counter() - start)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # One more step, counted (measure_peak's dispatch mode slows it: not timed).
    held = _local_bytes(model.parameters()) + _local_bytes(
        [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)])
    dist.barrier()
    peak = held + torch_mp.measure_peak(model.train_step, **inputs, target=target, loss_fn=loss_fn)[1]
    del model, optimizer
    gc.collect()
    return statistics.median(times[1:]), peak


def _rank(rank, store_path, name, rows, steps, max_chunks, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=600))
    inputs, _, _ = batch_of(name, rows)
    start = time.perf_counter()
    costs = measure_costs(build(name), inputs)
    measuring = time.perf_counter() - start
    found = layouts(costs, WORLD, rows, max_chunks=max_chunks)
    results = []
    for layout in found:
        seconds, peak = _run_layout(name, costs, layout, rows, steps)
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, (seconds, peak))
        results.append((layout, max(g[0] for g in gathered), max(g[1] for g in gathered)))
    if rank == 0:
        with open(out, "wb") as handle:
            pickle.dump((costs, measuring, results), handle)
    dist.barrier()
    dist.destroy_process_group()


def _describe(layout) -> str:
    schedule = layout.schedule if layout.pp > 1 else "-"
    return (f"pp{layout.pp} tp{layout.tp} dp{layout.dp} {schedule:<16} M{layout.chunks} "
            f"{'ckpt' if layout.checkpoint == 'always' else '    '} {'sp' if layout.sequence_parallel else '  '}")


def report(name, rows, costs, measuring, results):
    mib = 2**20
    model = build(name)
    print(f"\n== {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, batch {rows}, "
          f"{len(results)} layouts on {WORLD} processes; cost table measured in {measuring:.1f} s "
          "; links " + ", ".join(f"{dim} {costs.link(dim)[0] * 1e6:.0f} us {1 / costs.link(dim)[1] / 1e9:.2f} GB/s"
                                  for dim in ("tp", "dp", "pp")))
    print(f"{'layout':<28} {'pred ms':>8} {'meas ms':>8} {'p/m':>5} {'pred MiB':>9} {'meas MiB':>9} {'p/m':>5}")
    time_ok = memory_ok = 0
    for layout, seconds, peak in results:
        predicted_s = step_seconds(costs, layout)
        predicted_peak = max(peak_bytes(costs, layout))
        time_ok += abs(predicted_s / seconds - 1) <= 0.25
        memory_ok += abs(predicted_peak / peak - 1) <= 0.10
        print(f"{_describe(layout):<28} {predicted_s * 1e3:>8.1f} {seconds * 1e3:>8.1f} {predicted_s / seconds:>5.2f} "
              f"{predicted_peak / mib:>9.1f} {peak / mib:>9.1f} {predicted_peak / peak:>5.2f}")
    print(f"step time within 25%: {time_ok} of {len(results)}; peak memory within 10%: {memory_ok} of {len(results)}")
    peaks = sorted(max(peak_bytes(costs, layout)) for layout, _, _ in results)
    measured = {layout: (seconds, peak) for layout, seconds, peak in results}
    roomy = peaks[-1] * 2
    plan = torch_mp.plan(model, WORLD, roomy, rows, costs=costs, max_chunks=max(l.chunks for l in measured))
    tight = max(peaks[0] * 1.02, plan.peak_bytes * 0.6)
    for limit in (roomy, int(tight)):
        plan = torch_mp.plan(model, WORLD, limit, rows, costs=costs, max_chunks=max(l.chunks for l in measured))
        fitting = [c.layout for c in (plan.chosen,) + plan.alternatives]
        best = min(fitting, key=lambda layout: measured[layout][0])
        pick = plan.chosen.layout
        ran_out = [layout for layout in fitting if measured[layout][1] > limit]
        print(f"limit {limit / mib:.1f} MiB: pick {_describe(pick).strip()} {measured[pick][0] * 1e3:.1f} ms; best "
              f"measured of the {len(fitting)} that fit: {_describe(best).strip()} {measured[best][0] * 1e3:.1f} ms; "
              f"pick / best {measured[pick][0] / measured[best][0]:.2f}; said to fit but went over: {len(ran_out)}"
              + (f" ({', '.join(_describe(layout).strip() for layout in ran_out[:4])})" if ran_out else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["mlp", "llama", "mixtral"])
    parser.add_argument("--max-chunks", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each line as it comes, also into a file
    if args.quick:
        args.models, args.max_chunks, args.steps = ["mlp"], 2, 2
    print(f"load average before: {os.getloadavg()[0]:.1f} (this host's cores: {os.cpu_count()})")
    for name in args.models:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "results.pickle")
            mp.spawn(_rank, args=(os.path.join(folder, "store"), name, args.rows, args.steps, args.max_chunks, out),
                     nprocs=WORLD)
            with open(out, "rb") as handle:
                costs, measuring, results = pickle.load(handle)
        report(name, args.rows, costs, measuring, results)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
