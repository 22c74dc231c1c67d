#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace torch_mp::detail {

// Starts an all-reduce (sum, or `op`) of `tensor` in place. Like the flat collectives below it hands
// the backend a view of its own: the backend's worker thread keeps the last collective's tensors
// until its next one, and a tensor Python has seen and dropped meanwhile would be released on that
// thread, which must then take the GIL (fatal during interpreter shutdown).
c10::intrusive_ptr<c10d::Work> start_all_reduce(
    c10d::ProcessGroup& group,
    const at::Tensor& tensor,
    c10d::ReduceOp op = c10d::ReduceOp::SUM);

// output[r] = rank r's input, for output of shape [group size, *input.shape]; blocks until done.
void all_gather_into(c10d::ProcessGroup& group, at::Tensor& output, at::Tensor& input);
// output = sum over ranks of input[this rank], for input of shape [group size, *output.shape].
void reduce_scatter_into(c10d::ProcessGroup& group, at::Tensor& output, at::Tensor& input);

} // namespace torch_mp::detail
