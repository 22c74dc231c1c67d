// The autograd formula of all_to_all: the gradient of the rows this rank received goes back to the
// ranks that sent them, the reverse all-to-all (output and input split sizes swapped). The backward
// calls the differentiable op, so double backward works.
#include <torch/autograd.h>
#include <torch/library.h>

#include <torch_mp/ops.h>

#include "ops/autograd/group_function.h"

namespace torch_mp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr char kAllToAll[] = "torch_mp.all_to_all";

class AllToAllFunction : public torch::autograd::Function<AllToAllFunction> {
 public:
  static constexpr bool is_traceable = true;

  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& self,
      c10::IntArrayRef output_split_sizes,
      c10::IntArrayRef input_split_sizes,
      c10::string_view group_name,
      int64_t group_size) {
    const detail::GroupForward scope(ctx, kAllToAll, group_name, group_size);
    ctx->saved_data["output_split_sizes"] = output_split_sizes.vec();
    ctx->saved_data["input_split_sizes"] = input_split_sizes.vec();
    return all_to_all(self, output_split_sizes, input_split_sizes, scope.group);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto grad = grad_outputs[0];
    if (grad.defined()) {
      const detail::GroupBackward scope(ctx, kAllToAll);
      grad = all_to_all(
          grad, ctx->saved_data["input_split_sizes"].toIntVector(),
          ctx->saved_data["output_split_sizes"].toIntVector(), scope.group);
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
  return AllToAllFunction::apply(self, output_split_sizes, input_split_sizes, group_name, group_size);
}

} // namespace

TORCH_LIBRARY_IMPL(torch_mp, Autograd, m) {
  m.impl("all_to_all", &all_to_all_autograd);
}

} // namespace torch_mp
