// The flat collectives under the primitive ops, in one place across PyTorch versions.
#include "comm/collectives.h"

namespace torch_mp::detail {

// c10d's flat all-gather and reduce-scatter carry deprecation notes in recent releases; their
// replacements do not exist in the oldest releases we support, and the flat forms are what the
// backends implement natively.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

// Both run on flat views: backends split the larger buffer into group-size pieces along dim 0.
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
