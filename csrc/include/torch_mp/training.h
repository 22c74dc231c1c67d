#pragma once

// Training utilities that see the whole model (the C++ face of torch_mp.clip_grad_norm_ and
// torch_mp.get_total_norm): the dense model's gradient norm, the same on every rank, for a
// SplitSequential, the Sequential that torch_mp::tensor_parallel returns, a PipelineParallel (of
// tensor-parallel stages too), or any module.
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

namespace torch_mp {

// The norm_type-norm (p > 0, or infinity: the largest absolute element) of all the gradients of
// `module`'s parameters as one vector, each element of the dense model counted once: the shards of
// nn::ColumnParallelLinear (weight, bias), nn::RowParallelLinear (weight) and
// nn::VocabParallelEmbedding (weight) on their ranks, summed over their group (one all-reduce); every
// other parameter (replicated: whole on each rank) on the group's rank 0 only. A PipelineParallel's
// parameters are each on one rank of its group: the sum goes on over that group too (a second
// all-reduce), its tensor-parallel group the one its Sequential was sharded over. Parameters without a
// gradient do not count. Returns a 0-dim float32 tensor on the first gradient's device (the CPU when
// there is none), equal on every rank. A collective when the module holds parallel layers: every rank
// of their group calls it. What torch.nn.utils.get_total_norm gives on the dense model (Megatron-LM's
// get_grad_norm_fp32). Errors: c10::ValueError for norm_type <= 0 or NaN, or parallel layers of
// different groups; torch_mp::CollectiveError when a peer does not answer within the group's timeout.
at::Tensor get_total_norm(const torch::nn::Module& module, double norm_type = 2.0);

// Scales every gradient of `module` in place by min(1, max_norm / (total + 1e-6)), torch's formula,
// with total = get_total_norm(module, norm_type): every rank clips by the dense model's norm. Returns
// the total before clipping. Errors: c10::ValueError for max_norm < 0 and as get_total_norm;
// c10::Error for a total that is NaN or infinite when error_if_nonfinite.
at::Tensor clip_grad_norm_(
    torch::nn::Module& module,
    double max_norm,
    double norm_type = 2.0,
    bool error_if_nonfinite = false);

} // namespace torch_mp
