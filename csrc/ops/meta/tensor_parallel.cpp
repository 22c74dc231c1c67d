#include <ATen/ATen.h>
#include <torch/library.h>

namespace torch_mp {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> column_parallel_linear_backward_meta(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    std::array<bool, 3> output_mask,
    c10::string_view,
    int64_t) {
  const auto options = grad_output.options();
  const auto none = at::empty({0}, options);
  return {
      output_mask[0] ? at::empty_symint(input.sym_sizes(), options) : none,
      output_mask[1] ? at::empty_symint(weight.sym_sizes(), options) : none,
      output_mask[2] ? at::empty_symint({weight.sym_size(0)}, options) : none};
}

} // namespace

TORCH_LIBRARY_IMPL(torch_mp, Meta, m) {
  m.impl("_column_parallel_linear_backward", &column_parallel_linear_backward_meta);
}

} // namespace torch_mp
