"""Runs a test body on several Gloo ranks, each a process, bounded by a timeout so a hang fails."""
import datetime
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, store_path: str, fn, args) -> None:
    torch.manual_seed(1234)  # the same "dense" tensors on every rank
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args, timeout: float = 240.0) -> None:
    """Calls ``fn(rank, world_size, *args)`` on ``world_size`` processes with a default Gloo group.
    A failure on any rank fails the caller with that rank's traceback; past ``timeout`` seconds the
    processes are killed and the caller fails."""
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(_worker, args=(world_size, os.path.join(folder, "store"), fn, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks within {timeout} s")
