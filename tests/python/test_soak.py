"""bench/bench_soak.py for a few steps: resident memory does not grow with training steps."""
import json
import os
import subprocess
import sys

import torch_mp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# MiB per 100 steps: a leak of one activation-sized tensor per step (8 x 32 x 64 floats, 64 KiB) gives
# about 6; steps 40 to 120, where the allocator still settles, about 1 (1,000 steps: 0.1). Over steps
# 20 to 60 one allocator burst of 1.6 MiB once made 4.03: the slope needs the longer window.
DRIFT_BOUND = 4.0


def test_resident_memory_does_not_grow():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(torch_mp.__file__)), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_soak.py"), "--steps", "120",
                             "--warmup", "40"], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.rsplit("RESULT ", 1)[1])
    for rank, entry in enumerate(report["ranks"]):
        assert entry["drift_mib_per_100_steps"] < DRIFT_BOUND, f"rank {rank}: {entry}\n{result.stdout}"
