"""torch_mp.to_device against Tensor.to for a 256 MiB float32 tensor, measured in the same run.

    python bench/bench_to_device.py [--mib 256] [--repeats 20]

With a GPU: host to device and device to host (pageable and pinned host memory). Without one: a
copy within the CPU (Tensor.to(copy=True)), which shows the operator's own overhead.
Prints the median time of each and the ratio ours / Tensor.to (below 1.0: ours is faster).
"""
import argparse
import statistics
import time

import torch

import torch_mp


def median_seconds(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    numel = args.mib * 2**20 // 4

    cases = []
    if torch.cuda.is_available():
        gpu = torch.device("cuda:0")
        sync = torch.cuda.synchronize
        host = torch.randn(numel)
        pinned = host.pin_memory()
        device = host.to(gpu)
        cases += [
            ("cpu -> cuda:0 (pageable)", host, gpu, False),
            ("cpu -> cuda:0 (pinned, non_blocking)", pinned, gpu, True),
            ("cuda:0 -> cpu", device, torch.device("cpu"), False),
            ("cuda:0 -> cpu (non_blocking)", device, torch.device("cpu"), True),
        ]
    else:
        sync = lambda: None  # noqa: E731
        cases.append(("cpu -> cpu (copy)", torch.randn(numel), torch.device("cpu"), False))

    print(f"{args.mib} MiB float32, median of {args.repeats}")
    print(f"{'direction':<38} {'Tensor.to ms':>12} {'to_device ms':>12} {'GB/s ours':>10} {'ratio':>6}")
    for name, tensor, target, non_blocking in cases:
        reference = median_seconds(lambda: tensor.to(target, non_blocking=non_blocking, copy=True),
                                   args.repeats, sync)
        ours = median_seconds(lambda: torch_mp.to_device(tensor, target, non_blocking), args.repeats, sync)
        gbps = args.mib * 2**20 / ours / 1e9
        print(f"{name:<38} {reference * 1e3:>12.2f} {ours * 1e3:>12.2f} {gbps:>10.2f} {ours / reference:>6.3f}")


if __name__ == "__main__":
    main()
