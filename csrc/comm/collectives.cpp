// The flat collectives under the primitive ops, in one place across PyTorch versions.
#include "comm/collectives.h"

namespace torch_mp::detail {

c10::intrusive_ptr<c10d::Work> start_all_reduce(c10d::ProcessGroup& group, const at::Tensor& tensor, c10d::ReduceOp op) {
  std::vector<at::Tensor> tensors{tensor.view({-1})};
  c10d::AllreduceOptions options;
  options.reduceOp = op;
  return group.allreduce(tensors, options);
}

// c10d's flat all-gather and reduce-scatter carry deprecation notes in recent releases; their
// replacements do not exist in the oldest releases we support, and the flat forms are what the
// backends implement natively.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

// Both run on flat views (views of their own, see start_all_reduce): backends split the larger
// buffer into group-size pieces along dim 0.
void all_gather_into(c10d::ProcessGroup& group, at::Tensor& output, at::Tensor& input) {
  auto flat_output = output.view({-1});
  auto flat_input = input.view({-1});
  group._allgather_base(flat_output, flat_input)->wait();
}

void reduce_scatter_into(c10d::ProcessGroup& group, at::Tensor& output, at::Tensor& input) {
  auto flat_output = output.view({-1});
  auto flat_input = input.view({-1});
  group._reduce_scatter_base(flat_output, flat_input)->wait();
}

#pragma GCC diagnostic pop

} // namespace torch_mp::detail
