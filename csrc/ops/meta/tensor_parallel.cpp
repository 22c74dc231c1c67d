#include <ATen/ATen.h>
#include <torch/library.h>

namespace torch_mp {
namespace {

at::Tensor _row_parallel_linear_meta(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>&,
    c10::string_view,
    int64_t) {
  auto sizes = input.sym_sizes().vec();
  sizes.back() = weight.sym_size(0);
  return at::empty_symint(sizes, input.options());
}

} // namespace

TORCH_LIBRARY_IMPL(torch_mp, Meta, m) {
  m.impl("_row_parallel_linear", &_row_parallel_linear_meta);
}

} // namespace torch_mp
