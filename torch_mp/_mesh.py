"""Device meshes: pipeline stages across one dim, data-parallel replicas across another, tensor
parallelism across the innermost."""
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def _check_size(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"init_mesh: {name} = {value!r}; expected an int >= 1")


def init_mesh(dp: int = 1, tp: Optional[int] = None, device_type: Optional[str] = None,
              pp: Optional[int] = None) -> DeviceMesh:
    """A DeviceMesh over the default group with named dims: ``("pp", "dp", "tp")`` when ``pp`` is
    given (1 included: code that reads ``mesh["pp"]`` runs at every size), else ``("dp", "tp")``
    as before pipelines joined the mesh. Tensor parallel is innermost: ranks that differ by one
    share a tensor-parallel group (the fast links inside a node); then data parallel; pipeline
    stages outermost, as Megatron-Core orders them (rank = (pp_index * dp + dp_index) * tp +
    tp_index). With 8 ranks, ``pp=2, dp=2, tp=2``: TP groups {0,1} {2,3} {4,5} {6,7}, DP groups
    {0,2} {1,3} {4,6} {5,7}, PP groups {0,4} {1,5} {2,6} {3,7}. For example::

        mesh = torch_mp.init_mesh(pp=2, dp=2, tp=2)
        torch_mp.tensor_parallel(model, group=mesh["tp"])
        torch_mp.pipeline(model, group=mesh["pp"], data_parallel=mesh["dp"], chunks=4)

        mesh = torch_mp.init_mesh(dp=2, tp=4)  # no pipeline: 2-D
        torch_mp.tensor_parallel(model, group=mesh["tp"])
        with torch_mp.local_parameters(model):
            model = DistributedDataParallel(model, process_group=mesh["dp"].get_group())
        # or torch.distributed.fsdp.fully_shard(model, mesh=mesh["dp"])

    ``tp`` defaults to world size / (pp * dp); ``device_type`` to "cuda" under NCCL, else "cpu".
    The layout of Megatron-LM's 3-D parallelism (Narayanan et al., 2021) over PyTorch's
    ``init_device_mesh``.

    Raises RuntimeError when torch.distributed is not initialized; ValueError naming the dim and
    its value for a size that is not an int >= 1, and when ``pp * dp * tp`` is not the world size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("init_mesh: torch.distributed is not initialized; expected init_process_group() first "
                           "(torchrun sets up its environment)")
    world = dist.get_world_size()
    stages = 1 if pp is None else pp
    if pp is not None:
        _check_size("pp", pp)
    for name, value in (("dp", dp), ("tp", tp)):
        if value is not None:
            _check_size(name, value)
    tp = world // (stages * dp) if tp is None and stages * dp > 0 else tp
    if pp is None:
        if dp < 1 or tp < 1 or dp * tp != world:
            raise ValueError(f"init_mesh: dp={dp} x tp={tp} = {dp * tp} ranks but the world has {world}; expected "
                             "dp * tp == world size")
    elif dp < 1 or tp < 1 or pp * dp * tp != world:
        raise ValueError(f"init_mesh: pp={pp} x dp={dp} x tp={tp} = {pp * dp * tp} ranks but the world has {world}; "
                         "expected pp * dp * tp == world size")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" and torch.cuda.is_available() else "cpu"
    if pp is None:
        return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
