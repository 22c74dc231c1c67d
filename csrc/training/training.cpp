#include <torch_mp/training.h>

#include <cmath>
#include <limits>
#include <optional>
#include <unordered_set>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/container/any.h>

#include <torch_mp/nn.h>
#include <torch_mp/ops.h>
#include <torch_mp/pipeline_parallel.h>

#include "nn/parallel_group.h"

namespace torch_mp {
namespace {

// What one rank counts: the gradients of the shards it holds, the replicated ones on its
// tensor-parallel group's rank 0.
struct Counted {
  std::vector<at::Tensor> grads;           // every gradient (clipping scales them all)
  std::vector<at::Tensor> counted;         // those this rank counts
  std::optional<Group> group;              // the parallel layers' group, if any
  std::optional<Group> pipeline;           // a pipeline's group: each parameter on one of its ranks
};

Counted gradients_of(const torch::nn::Module& module) {
  Counted counted;
  std::unordered_set<const c10::TensorImpl*> sharded;
  counted.group = detail::tensor_parallel_group(module, "torch_mp::get_total_norm", &sharded);
  if (const auto* pipe = dynamic_cast<const PipelineParallelImpl*>(&module)) {
    // A stage with no parallel layers of its own still counts its replicated layers once per tp
    // group: the group the pipeline's whole Sequential was sharded over.
    counted.group = pipe->tensor_parallel_group();
    if (pipe->group().size > 1) {
      counted.pipeline = pipe->group();
    }
  }
  const bool first = !counted.group || counted.group->rank == 0;
  for (const auto& param : module.parameters()) {
    const auto& grad = param.grad();
    if (!grad.defined()) {
      continue;
    }
    counted.grads.push_back(grad);
    if (first || sharded.count(param.unsafeGetTensorImpl())) {
      counted.counted.push_back(grad);
    }
  }
  return counted;
}

at::Tensor total_norm(const Counted& counted, double norm_type) {
  TORCH_CHECK_VALUE(
      norm_type > 0, "torch_mp::get_total_norm: norm_type = ", norm_type, "; expected a number > 0 or infinity");
  const auto device = counted.grads.empty() ? c10::Device(c10::kCPU) : counted.grads.front().device();
  const bool inf = std::isinf(norm_type);
  auto local = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
  for (const auto& grad : counted.counted) {
    const auto norm = at::linalg_vector_norm(grad, norm_type, {}, false, at::kFloat).to(device);
    local = inf ? at::maximum(local, norm) : local + norm.pow(norm_type);
  }
  for (const auto& group : {counted.group, counted.pipeline}) {
    if (group) {
      local = primitives::all_reduce(local, inf ? "max" : "sum", *group);
    }
  }
  return inf ? local : local.pow(1.0 / norm_type);
}

} // namespace

at::Tensor get_total_norm(const torch::nn::Module& module, double norm_type) {
  return total_norm(gradients_of(module), norm_type);
}

at::Tensor clip_grad_norm_(torch::nn::Module& module, double max_norm, double norm_type, bool error_if_nonfinite) {
  TORCH_CHECK_VALUE(max_norm >= 0, "torch_mp::clip_grad_norm_: max_norm = ", max_norm, "; expected a number >= 0");
  const auto counted = gradients_of(module);
  const auto total = total_norm(counted, norm_type);
  TORCH_CHECK(
      !error_if_nonfinite || std::isfinite(total.item<double>()),
      "torch_mp::clip_grad_norm_: the total norm of order ", norm_type, " of the gradients is ", total.item<double>(),
      "; expected a finite norm (error_if_nonfinite)");
  const auto coefficient = at::clamp_max(max_norm / (total + 1e-6), 1.0);
  at::NoGradGuard no_grad;
  for (const auto& grad : counted.grads) {
    grad.mul_(coefficient.to(grad.device()));
  }
  return total;
}

} // namespace torch_mp
