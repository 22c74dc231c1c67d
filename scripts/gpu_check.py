"""Every GPU check in one call (`make gpu-check`, which builds first): the CUDA tests (Python and
C++) and the GPU benchmarks, each under a time limit so the whole stays under 8 minutes, then one
table of pass/fail, time and figures. Without a GPU it says so and exits 0.

    python scripts/gpu_check.py [--budget 480]

Exit status 1 if any check failed or ran out of time. A check is a command and the lines of its
output that carry its figures; add one to CHECKS.
"""
import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# (name, command, seconds allowed, pattern of the output lines reported as figures)
CHECKS = [
    ("CUDA tests (pytest)", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/python",
                             "-k", "cuda or gpu or nccl"], 240, r"^\d+ (passed|failed)|passed|failed"),
    ("C++ tests (build, CTest)", ["make", "--no-print-directory", "-o", "install", "test-cpp"], 150,
     r"tests passed|tests failed"),
    ("bench: to_device", [PY, "bench/bench_to_device.py"], 60, r"GB/s|ratio|x\b"),
    ("bench: pipeline --gpu", [PY, "bench/bench_pipeline.py", "--gpu", "--steps", "2", "--chunks", "1", "8"], 120,
     r"cuda|tokens/s|speedup"),
]


def gpu_name():
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def run(name, command, limit, pattern):
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        output, status = done.stdout + done.stderr, "pass" if done.returncode == 0 else f"FAIL ({done.returncode})"
    except subprocess.TimeoutExpired as timeout:
        output = timeout.stdout or ""
        status = f"FAIL (over {limit} s)"
    seconds = time.perf_counter() - start
    figures = [line.strip() for line in output.splitlines() if re.search(pattern, line)][-4:]
    if not status.startswith("pass"):
        print(f"--- {name}: {status}; its last output:\n" + "\n".join(output.splitlines()[-30:]), flush=True)
    return name, status, seconds, figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480, help="seconds for all the checks together")
    args = parser.parse_args()
    name = gpu_name()
    if name is None:
        print("gpu-check: this machine has no GPU (torch.cuda.is_available() is False): nothing to check")
        return 0
    print(f"gpu-check on {name}", flush=True)
    deadline = time.monotonic() + args.budget
    rows = []
    for check_name, command, limit, pattern in CHECKS:
        left = deadline - time.monotonic()
        if left < 10:
            rows.append((check_name, "FAIL (no time left)", 0.0, []))
            continue
        print(f"running {check_name} ...", flush=True)
        rows.append(run(check_name, command, min(limit, left), pattern))
    width = max(len(row[0]) for row in rows)
    print(f"\n{'check':<{width}}  {'result':<20}  {'time':>7}  figures")
    for check_name, status, seconds, figures in rows:
        lines = figures or ["-"]
        print(f"{check_name:<{width}}  {status:<20}  {seconds:>6.0f}s  {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<{width}}  {'':<20}  {'':>7}  {line}")
    failed = [row[0] for row in rows if not row[1].startswith("pass")]
    print(f"\ngpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
