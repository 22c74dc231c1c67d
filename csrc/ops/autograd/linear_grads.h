// The weight and bias gradients of a linear layer's local matmul (output = input @ weight.T + bias),
// shared by every autograd Function that multiplies by a weight: column- and row-parallel linears,
// the async TP ops and deferred_linear (whose W action computes them later).
#pragma once

#include <ATen/ATen.h>

namespace torch_mp::detail {

// The rows of a [..., features] tensor as a matrix [rows, features], in symbolic sizes (an int
// size() would specialize a dynamic batch or sequence length under torch.compile).
inline at::Tensor rows_of(const at::Tensor& t) {
  return t.dim() == 1 ? t.unsqueeze(0) : t.flatten(0, -2);
}

// grad [..., out], input [..., in] -> the weight's gradient [out, in].
inline at::Tensor linear_weight_grad(const at::Tensor& grad, const at::Tensor& input) {
  return rows_of(grad).t().mm(rows_of(input));
}

// grad [..., out] -> the bias's gradient [out].
inline at::Tensor linear_bias_grad(const at::Tensor& grad) {
  return rows_of(grad).sum(0);
}

} // namespace torch_mp::detail
