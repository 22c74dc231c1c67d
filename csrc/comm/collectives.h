#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace torch_mp::detail {

// output[r] = rank r's input, for output of shape [group size, *input.shape]; blocks until done.
void all_gather_into(c10d::ProcessGroup& group, at::Tensor& output, at::Tensor& input);
// output = sum over ranks of input[this rank], for input of shape [group size, *output.shape].
void reduce_scatter_into(c10d::ProcessGroup& group, at::Tensor& output, at::Tensor& input);

} // namespace torch_mp::detail
