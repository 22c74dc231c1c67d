"""Runs a test body on several Gloo ranks, each a process, bounded by a timeout so a hang fails."""
import datetime
import os
import pickle
import signal
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


# Ranks are forked from a server that imported these once (multiprocessing's "forkserver"), instead of
# each importing torch, torch_mp and transformers anew (3-6 s of CPU per rank): every rank is still a
# fresh process, with the caller's environment (the server's is the one it started with).
_PRELOAD = ["torch", "torch_mp", "transformers", "transformers.models.llama.modeling_llama",
            "transformers.models.gpt2.modeling_gpt2", "transformers.models.mixtral.modeling_mixtral",
            "models"]


def _worker(rank: int, world_size: int, folder: str, fn, args, group_timeout: float, survivors: bool,
            environ: dict) -> None:
    os.environ.clear()
    os.environ.update(environ)
    torch.manual_seed(1234)  # the same "dense" tensors on every rank
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(folder, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=group_timeout))
    if not survivors:
        try:
            fn(rank, world_size, *args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return
    # Some rank dies on purpose: no closing barrier, and what each survivor returns (or the traceback
    # it raised) goes to a file for the caller.
    try:
        outcome = ("returned", fn(rank, world_size, *args))
    except Exception:  # noqa: BLE001 (any failure goes to the caller, with its traceback)
        outcome = ("raised", traceback.format_exc())
    with open(os.path.join(folder, f"rank{rank}.pickle"), "wb") as handle:
        pickle.dump(outcome, handle)
    dist.destroy_process_group()


def _run(world_size: int, fn, args, timeout: float, group_timeout: float, survivors: bool, folder: str):
    mp.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    context = mp.start_processes(_worker, args=(world_size, folder, fn, args, group_timeout, survivors,
                                                dict(os.environ)),
                                 nprocs=world_size, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    try:
        if survivors:
            # A rank that dies must not end the others, as context.join() would: wait for each.
            for process in context.processes:
                process.join(max(0.0, deadline - time.monotonic()))
            if any(process.is_alive() for process in context.processes):
                raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks within {timeout} s")
            return
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def run_ranks(world_size: int, fn, *args, timeout: float = 240.0, group_timeout: float = 60.0) -> None:
    """Calls ``fn(rank, world_size, *args)`` on ``world_size`` processes with a default Gloo group.
    A failure on any rank fails the caller with that rank's traceback; past ``timeout`` seconds the
    processes are killed and the caller fails."""
    with tempfile.TemporaryDirectory() as folder:
        _run(world_size, fn, args, timeout, group_timeout, False, folder)


def run_ranks_until_death(world_size: int, fn, *args, timeout: float = 120.0,
                          group_timeout: float = 60.0) -> dict[int, object]:
    """Like ``run_ranks``, for a body in which some rank dies (``fn`` kills it): returns what ``fn``
    returned on each rank that survived, by rank; ranks that died are absent. A survivor that raised
    fails the caller with its traceback; past ``timeout`` seconds all are killed and the caller fails."""
    with tempfile.TemporaryDirectory() as folder:
        _run(world_size, fn, args, timeout, group_timeout, True, folder)
        results = {}
        for rank in range(world_size):
            path = os.path.join(folder, f"rank{rank}.pickle")
            if os.path.exists(path):
                with open(path, "rb") as handle:
                    kind, value = pickle.load(handle)
                if kind == "raised":
                    raise AssertionError(f"rank {rank} of {fn.__name__} raised:\n{value}")
                results[rank] = value
        return results


def fail_in_forward(model, call: int, how: str, stall: float) -> None:
    """Makes this rank fail on the ``call``-th forward of the first ``nn.Linear`` it holds for real (a
    pipeline stage's): ``how="dies"`` kills the process (SIGKILL, no clean-up); ``"stalls"`` sleeps
    ``stall`` seconds, past the others' timeout, then ends the process."""
    calls = []

    def hook(module, args):
        calls.append(None)
        if len(calls) == call:
            if how == "dies":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(stall)
            os._exit(0)

    next(m for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.is_meta) \
        .register_forward_pre_hook(hook)
