// The autograd formula of all_to_all: the gradient of the rows this rank received goes back to the
// ranks that sent them, the reverse all-to-all (output and input split sizes swapped). The backward
// calls the differentiable op, so double backward works.
#include <torch/autograd.h>
#include <torch/library.h>

#include <torch_mp/ops.h>

#include "comm/collectives.h"

namespace torch_mp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr char kAllToAll[] = "torch_mp.all_to_all";

class AllToAll : public torch::autograd::Function<AllToAll> {
 public:
  static constexpr bool is_traceable = true;

  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& self,
      c10::IntArrayRef output_split_sizes,
      c10::IntArrayRef input_split_sizes,
      c10::string_view group_name,
      int64_t group_size) {
    ctx->saved_data["output_split_sizes"] = output_split_sizes.vec();
    ctx->saved_data["input_split_sizes"] = input_split_sizes.vec();
    ctx->saved_data["group_name"] = std::string(group_name);
    ctx->saved_data["group_size"] = group_size;
    detail::OpScope scope(kAllToAll);
    at::AutoDispatchBelowADInplaceOrView guard;
    return all_to_all(self, output_split_sizes, input_split_sizes, Group{std::string(group_name), group_size, 0});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto grad = grad_outputs[0];
    if (grad.defined()) {
      detail::OpScope scope(kAllToAll, /*backward=*/true);
      const Group group{ctx->saved_data["group_name"].toStringRef(), ctx->saved_data["group_size"].toInt(), 0};
      grad = all_to_all(
          grad, ctx->saved_data["input_split_sizes"].toIntVector(),
          ctx->saved_data["output_split_sizes"].toIntVector(), group);
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor all_to_all_autograd(
    const at::Tensor& self,
    c10::IntArrayRef output_split_sizes,
    c10::IntArrayRef input_split_sizes,
    c10::string_view group_name,
    int64_t group_size) {
  return AllToAll::apply(self, output_split_sizes, input_split_sizes, group_name, group_size);
}

} // namespace

TORCH_LIBRARY_IMPL(torch_mp, Autograd, m) {
  m.impl("all_to_all", &all_to_all_autograd);
}

} // namespace torch_mp
