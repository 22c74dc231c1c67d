"""Splits a GPT-2 (built from a small config, random weights) layer-wise across two devices and trains
it next to the unsplit model: the device map, then both losses step by step.

    python examples/python/split_demo.py [--devices cuda:0 cpu] [--steps 10]

Devices default to cuda:0 and cpu where a GPU exists, else cpu twice (each layer run still crosses
a real stage boundary through torch_mp.to_device).
"""
import argparse
import copy

import torch
import transformers

import torch_mp


def main():
    default_devices = ["cuda:0", "cpu"] if torch.cuda.is_available() else ["cpu", "cpu"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=default_devices)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=128, n_layer=args.layers,
                                     n_head=4, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     use_cache=False)
    dense = transformers.GPT2LMHeadModel(config)
    split = torch_mp.split(copy.deepcopy(dense), args.devices)

    print(f"GPT-2 with {args.layers} blocks split across {args.devices}")
    print("device map:")
    for name, device in split.device_map.items():
        print(f"  {name:<24} {device}")
    print(torch_mp.memory_report(split))

    data = torch.randint(0, config.vocab_size, (args.steps, 8, 32))
    dense_optimizer = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    split_optimizer = torch.optim.AdamW(split.parameters(), lr=1e-3)
    print(f"{'step':>4}  {'unsplit loss':>12}  {'split loss':>12}")
    for step, batch in enumerate(data):
        losses = []
        for model, optimizer in ((dense, dense_optimizer), (split, split_optimizer)):
            optimizer.zero_grad()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        print(f"{step:>4}  {losses[0]:>12.6f}  {losses[1]:>12.6f}")


if __name__ == "__main__":
    main()
