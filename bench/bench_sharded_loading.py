"""Peak resident memory per rank when loading a ~4 GB fp32 Llama-style safetensors checkpoint (made
here, in shards with an index, as transformers saves them): dense, and sharded by tensor_parallel
at TP=2 and TP=4 from a model built without memory (init_empty_weights), each rank reading only its
slices. Also the time to shard and load. All measured in one run.

    python bench/bench_sharded_loading.py [--folder /tmp/torch_mp_llama] [--layers 16]

Target: peak per rank at most 1.25 x (checkpoint size / ranks) + 300 MB, the peak of resident memory
(memory-mapped checkpoint pages included, every weight read once after loading) taken above the
process's resident memory after importing torch and transformers.
"""
import argparse
import datetime
import json
import os
import statistics
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import torch_mp


def config(layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504,
                                    num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                                    max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False)


def make_checkpoint(folder: str, layers: int) -> int:
    """Writes random weights shard by shard (about 1 GB each) with a transformers-style index."""
    from safetensors.torch import save_file

    index_path = os.path.join(folder, "model.safetensors.index.json")
    with torch_mp.init_empty_weights():
        model = transformers.LlamaForCausalLM(config(layers))
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    if os.path.exists(index_path):
        return sum(torch.Size(shape).numel() * 4 for shape in shapes.values())
    os.makedirs(folder, exist_ok=True)
    weight_map, shard, shard_bytes, count = {}, {}, 0, 0
    generator = torch.Generator().manual_seed(0)

    def flush():
        nonlocal shard, shard_bytes, count
        name = f"model-{count:05d}.safetensors"
        save_file(shard, os.path.join(folder, name))
        weight_map.update({key: name for key in shard})
        shard, shard_bytes, count = {}, 0, count + 1

    for name, shape in shapes.items():
        shard[name] = torch.randn(shape, generator=generator) * 0.02
        shard_bytes += shard[name].numel() * 4
        if shard_bytes >= 2**30:
            flush()
    if shard:
        flush()
    with open(index_path, "w") as handle:
        json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    return sum(torch.Size(shape).numel() * 4 for shape in shapes.values())


class PeakMemory:
    """Samples this process's resident memory every 5 ms: all of it (VmRSS, memory-mapped checkpoint
    pages included) and the anonymous part (what loading allocates)."""

    def __init__(self):
        self.peak = {"VmRSS": 0, "RssAnon": 0}
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def resident():
        values = {}
        with open("/proc/self/status") as status:
            for line in status:
                key = line.split(":")[0]
                if key in ("VmRSS", "RssAnon"):
                    values[key] = int(line.split()[1]) * 1024
        return values

    def _sample(self):
        while self._running:
            self._update()
            time.sleep(0.005)

    def _update(self):
        for key, value in self.resident().items():
            self.peak[key] = max(self.peak[key], value)

    def __enter__(self):
        self.base = self.resident()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self._update()

    def above_base(self, key):
        return self.peak[key] - self.base[key]


def load(rank, world, folder, layers, mode, store_path, queue):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=10))
    with PeakMemory() as memory:
        start = time.perf_counter()
        if mode == "stock":
            from safetensors.torch import load_file

            model = transformers.LlamaForCausalLM(config(layers))
            state = {}
            for file in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
                state.update(load_file(os.path.join(folder, file)))
            model.load_state_dict(state)
            del state
        else:
            with torch_mp.init_empty_weights():
                model = transformers.LlamaForCausalLM(config(layers))
            if world > 1:
                torch_mp.tensor_parallel(model)
            torch_mp.load_full_state_dict(model, folder)
        seconds = time.perf_counter() - start
        # Reads every weight once, so memory-mapped ones count as resident as they will in training.
        for parameter in model.parameters():
            parameter.detach().sum()
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    queue.put((rank, memory.above_base("VmRSS"), memory.above_base("RssAnon"), held, seconds))
    if world > 1:
        dist.destroy_process_group()


def run(mode, world, folder, layers):
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as scratch:
        mp.start_processes(load, args=(world, folder, layers, mode, os.path.join(scratch, "store"), queue),
                           nprocs=world, start_method="spawn")
    return [queue.get() for _ in range(world)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "torch_mp_llama"))
    parser.add_argument("--layers", type=int, default=19)  # 19 blocks: about 4 GB in fp32
    args = parser.parse_args()
    size = make_checkpoint(args.folder, args.layers)
    print(f"checkpoint: {size / 2**30:.2f} GiB fp32 in {args.folder}")
    print(f"{'load':<40} {'ranks':>5} {'size/ranks':>10} {'peak RSS':>10} {'anon':>8} {'held/rank':>10} "
          f"{'target':>8} {'peak/target':>11} {'seconds':>8}")
    mib = 2**20
    for mode, world in [("stock", 1), ("torch_mp", 1), ("torch_mp", 2), ("torch_mp", 4)]:
        results = run(mode, world, args.folder, args.layers)
        peak = max(r[1] for r in results)
        anonymous = max(r[2] for r in results)
        held = max(r[3] for r in results)
        seconds = statistics.median(r[4] for r in results)
        target = 1.25 * size / world + 300 * mib
        label = {"stock": "dense, stock (build + load_state_dict)", "torch_mp": "torch_mp"}[mode]
        if mode == "torch_mp":
            label = "dense, init_empty_weights + lazy load" if world == 1 else f"tensor_parallel TP={world}"
        print(f"{label:<40} {world:>5} {size / world / mib:>8.0f}Mi {peak / mib:>8.0f}Mi {anonymous / mib:>6.0f}Mi "
              f"{held / mib:>8.0f}Mi {target / mib:>6.0f}Mi {peak / target:>11.2f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
