#include <ATen/ATen.h>
#include <torch/library.h>

namespace torch_mp {
namespace {

at::Tensor deferred_linear_meta(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>&,
    int64_t) {
  TORCH_CHECK_VALUE(
      weight.dim() == 2 && input.dim() >= 1 && input.sym_size(-1) == weight.sym_size(1),
      "torch_mp.deferred_linear: input has shape ", input.sym_sizes(), " but weight ", weight.sym_sizes(),
      "; expected input [..., in_features] and weight [out_features, in_features]");
  auto sizes = input.sym_sizes().vec();
  sizes.back() = weight.sym_size(0);
  return at::empty_symint(sizes, input.options());
}

} // namespace

TORCH_LIBRARY_IMPL(torch_mp, Meta, m) {
  m.impl("deferred_linear", &deferred_linear_meta);
}

} // namespace torch_mp
