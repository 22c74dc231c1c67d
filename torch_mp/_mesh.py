"""2-D device meshes: data parallel across one dim, tensor parallel across the other."""
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def init_mesh(dp: int = 1, tp: Optional[int] = None, device_type: Optional[str] = None) -> DeviceMesh:
    """A ``(dp, tp)`` DeviceMesh over the default group, dims named "dp" and "tp". Ranks that
    differ by one are in one tensor-parallel group (the fast links inside a node).

        mesh = torch_mp.init_mesh(dp=2, tp=4)
        torch_mp.tensor_parallel(model, group=mesh["tp"])
        model = DistributedDataParallel(model, process_group=mesh["dp"].get_group())
        # or torch.distributed.fsdp.fully_shard(model, mesh=mesh["dp"])

    ``tp`` defaults to world size / dp; ``device_type`` to "cuda" under NCCL, else "cpu". The
    layout of Megatron-LM's 2-D parallelism (Narayanan et al., 2021) over PyTorch's
    ``init_device_mesh``.

    Raises RuntimeError when torch.distributed is not initialized; ValueError when ``dp * tp`` is
    not the world size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("init_mesh: torch.distributed is not initialized; expected init_process_group() first "
                           "(torchrun sets up its environment)")
    world = dist.get_world_size()
    tp = world // dp if tp is None else tp
    if dp < 1 or tp < 1 or dp * tp != world:
        raise ValueError(f"init_mesh: dp={dp} x tp={tp} = {dp * tp} ranks but the world has {world}; expected "
                         "dp * tp == world size")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" and torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
