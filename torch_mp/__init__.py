"""torch_mp: model parallelism for PyTorch, with a C++ core.

Importing the package loads libtorch_mp, which registers the operators under torch.ops.torch_mp.
"""
import os

import torch  # noqa: F401  (loads torch's libraries before libtorch_mp)

from torch_mp import _C  # noqa: F401  (links libtorch_mp: registers torch.ops.torch_mp.*)
from torch_mp._C import CollectiveError
from torch_mp import nn
from torch_mp._ops import (
    all_gather_matmul,
    all_to_all,
    column_parallel_linear,
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    matmul_reduce_scatter,
    reduce_from_tp,
    reduce_scatter_to_sp,
    row_parallel_linear,
    scatter_to_tp,
    to_device,
)
from torch_mp._checkpoint.checkpoint import load, save
from torch_mp._hooks import linear_hook
from torch_mp._mesh import init_mesh
from torch_mp._pipelining.pipeline import pipeline
from torch_mp._planner.apply import parallelize
from torch_mp._planner.costs import CostTable
from torch_mp._planner.plans import Plan
from torch_mp._planner.search import plan
from torch_mp._pipelining.timeline import Timeline, TimelineEvent, plot_timeline
from torch_mp._report import measure_peak, memory_report
from torch_mp._split import split
from torch_mp._state import ParallelState, state_of
from torch_mp._checkpoint.state_dict import full_state_dict, init_empty_weights, load_full_state_dict
from torch_mp._tensor_parallel.dtensor import local_parameters
from torch_mp._tensor_parallel.parallelize import tensor_parallel
from torch_mp._training import GradScaler, clip_grad_norm_, get_total_norm

__version__ = "0.1.0"

# For CMake users: find_package(TorchMP) with this folder on CMAKE_PREFIX_PATH, beside
# torch.utils.cmake_prefix_path.
cmake_prefix_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "share", "cmake")

__all__ = [
    "CollectiveError",
    "CostTable",
    "GradScaler",
    "ParallelState",
    "Plan",
    "all_gather_matmul",
    "Timeline",
    "TimelineEvent",
    "all_to_all",
    "clip_grad_norm_",
    "cmake_prefix_path",
    "column_parallel_linear",
    "copy_to_tp",
    "full_state_dict",
    "gather_from_sp",
    "gather_from_tp",
    "get_total_norm",
    "init_empty_weights",
    "init_mesh",
    "linear_hook",
    "load",
    "load_full_state_dict",
    "local_parameters",
    "matmul_reduce_scatter",
    "measure_peak",
    "memory_report",
    "nn",
    "parallelize",
    "plan",
    "reduce_from_tp",
    "reduce_scatter_to_sp",
    "row_parallel_linear",
    "save",
    "scatter_to_tp",
    "split",
    "state_of",
    "pipeline",
    "plot_timeline",
    "tensor_parallel",
    "to_device",
]
