"""Prints the README's model-zoo table: each model of zoo.py through split (two CPU stages) and
tensor_parallel(plan="auto") on 2 Gloo ranks (and 4 for test_zoo's few), with the share of the
parameters each rank holds. Every cell comes from the same checks as test_zoo.py.

    python tests/python/zoo_table.py
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zoo  # noqa: E402
from distributed import run_ranks  # noqa: E402
from test_zoo import FOUR_RANKS  # noqa: E402

NAMES = {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX", "gptj": "GPT-J", "opt": "OPT", "llama": "Llama (GQA)",
         "mistral": "Mistral", "mixtral": "Mixtral (MoE)", "qwen2": "Qwen2", "qwen3": "Qwen3 (q/k norm)",
         "gemma2": "Gemma 2 (scaled embedding)", "phi3": "Phi-3", "falcon": "Falcon (qkv per head)",
         "falcon_mqa": "Falcon (multi-query, 1 KV head)", "falcon_gqa": "Falcon (new decoder, 2 KV heads)",
         "bert": "BERT", "roberta": "RoBERTa", "distilbert": "DistilBERT", "t5": "T5 (relative bias)",
         "bart": "BART", "vit": "ViT", "tv_vit_b_16": "torchvision vit_b_16", "tv_convnext": "torchvision convnext",
         "nn_transformer": "nn.Transformer", "nanogpt": "nanoGPT-style (full-width split)"}


def _collect(rank, world, names, path):
    rows = {}
    for name in names:
        outcome, share = zoo.check_tensor_parallel(name, rank, world)
        rows[name] = (outcome, share)
    if rank == 0:
        with open(path, "w") as handle:
            json.dump(rows, handle)


def _run(world, names):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "rows.json")
        run_ranks(world, _collect, names, path, timeout=900)
        with open(path) as handle:
            return json.load(handle)


def _cell(outcome, share):
    return outcome if share is None else f"{outcome}, {share:.0%} of the parameters per rank"


def main():
    two = _run(2, list(zoo.BUILDERS))
    four = _run(4, FOUR_RANKS)
    print("| model | split (2 CPU stages) | tensor parallel, 2 ranks | 4 ranks |")
    print("| --- | --- | --- | --- |")
    for name in zoo.BUILDERS:
        split = zoo.check_split(name)
        at_four = _cell(*four[name]) if name in four else ""
        print(f"| {NAMES[name]} | {split} | {_cell(*two[name])} | {at_four} |")


if __name__ == "__main__":
    main()
