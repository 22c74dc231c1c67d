// Meta kernels of the async TP ops, in symbolic sizes; the group's size is an argument.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/checks.h"

namespace torch_mp {
namespace {

std::tuple<at::Tensor, std::vector<at::Tensor>> all_gather_matmul_meta(
    const at::Tensor& input,
    at::TensorList weights,
    int64_t dim,
    int64_t chunks,
    c10::string_view,
    int64_t group_size) {
  const auto wrapped =
      detail::check_all_gather_matmul("torch_mp.all_gather_matmul", input, weights, dim, chunks, group_size);
  auto sizes = input.sym_sizes().vec();
  sizes[wrapped] *= group_size;
  std::vector<at::Tensor> outputs;
  for (const auto& weight : weights) {
    auto output_sizes = sizes;
    output_sizes.back() = weight.sym_size(0);
    outputs.push_back(at::empty_symint(output_sizes, input.options()));
  }
  return {at::empty_symint(sizes, input.options()), outputs};
}

at::Tensor matmul_reduce_scatter_primitive_meta(
    at::TensorList inputs,
    at::TensorList weights,
    const std::optional<at::Tensor>& addend,
    int64_t dim,
    int64_t chunks,
    c10::string_view,
    int64_t group_size) {
  const auto wrapped = detail::check_matmul_reduce_scatter(
      "torch_mp.matmul_reduce_scatter", inputs, weights, addend, dim, chunks, group_size);
  const auto& reference = inputs.empty() ? *addend : inputs[0];
  auto sizes = reference.sym_sizes().vec();
  sizes[wrapped] = sizes[wrapped] / group_size;
  if (!inputs.empty()) {
    sizes.back() = weights[0].sym_size(0);
  }
  return at::empty_symint(sizes, reference.options());
}

at::Tensor matmul_reduce_scatter_meta(
    const at::Tensor& input,
    const at::Tensor& weight,
    int64_t dim,
    int64_t chunks,
    c10::string_view group_name,
    int64_t group_size) {
  return matmul_reduce_scatter_primitive_meta({input}, {weight}, std::nullopt, dim, chunks, group_name, group_size);
}

} // namespace

TORCH_LIBRARY_IMPL(torch_mp, Meta, m) {
  m.impl("all_gather_matmul", &all_gather_matmul_meta);
  m.impl("matmul_reduce_scatter", &matmul_reduce_scatter_meta);
  m.impl("_matmul_reduce_scatter", &matmul_reduce_scatter_primitive_meta);
}

} // namespace torch_mp
