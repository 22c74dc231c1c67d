#pragma once

#include <optional>
#include <string_view>
#include <unordered_set>

#include <c10/core/TensorImpl.h>
#include <torch/nn/module.h>
#include <torch_mp/comm.h>

namespace torch_mp::detail {

// The group of the tensor-parallel layers (nn::ColumnParallelLinear, RowParallelLinear,
// VocabParallelEmbedding) among `module` and its descendants, when one has a group of size > 1;
// nullopt otherwise. `sharded` (optional): receives their sharded parameters (colwise weight and
// bias, rowwise weight, vocab weight). c10::ValueError naming `op` for layers of two groups.
std::optional<Group> tensor_parallel_group(const torch::nn::Module& module, std::string_view op,
                                           std::unordered_set<const c10::TensorImpl*>* sharded = nullptr);

} // namespace torch_mp::detail
