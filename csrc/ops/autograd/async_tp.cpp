// Autograd of the async TP ops: each one's backward is the other, decomposed the same way. The
// all-gather + matmul's input gradient is a matmul + reduce-scatter, and the matmul +
// reduce-scatter's is an all-gather + matmul.
#include <torch/autograd.h>
#include <torch/library.h>

#include <torch_mp/ops.h>

#include "comm/collectives.h"
#include "ops/autograd/group_function.h"
#include "ops/checks.h"
#include "ops/autograd/linear_grads.h"

namespace torch_mp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using detail::kAllGatherMatmul;
using detail::kMatmulReduceScatter;

// forward: gathered = all_gather(input, dim), outputs[i] = gathered @ weights[i].T, returned as
// [gathered, *outputs]; backward: grad input = reduce_scatter(grad gathered + sum_i grad outputs[i] @
// weights[i], dim) decomposed (the primitive matmul + reduce-scatter), grad weights[i] =
// grad outputs[i].T @ gathered. No double backward: the primitive has no autograd.
class AllGatherMatmulFunction : public torch::autograd::Function<AllGatherMatmulFunction> {
 public:
  static constexpr bool is_traceable = true;

  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& input,
      at::TensorList weights,
      int64_t dim,
      int64_t chunks,
      c10::string_view group_name,
      int64_t group_size) {
    const detail::GroupForward scope(ctx, kAllGatherMatmul, group_name, group_size);
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["chunks"] = chunks;
    auto [gathered, outputs] = all_gather_matmul(input, weights, dim, scope.group, chunks);
    std::vector<at::Tensor> saved{gathered};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    variable_list result{gathered};
    result.insert(result.end(), outputs.begin(), outputs.end());
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto& gathered = saved[0];
    const auto weights_count = saved.size() - 1;
    variable_list grads(1 + weights_count + 4);
    const detail::GroupBackward scope(ctx, kAllGatherMatmul);
    std::vector<at::Tensor> products, transposed;
    for (size_t i = 0; i < weights_count; ++i) {
      const auto& grad = grad_outputs[1 + i];
      if (!grad.defined()) {
        continue;
      }
      if (ctx->needs_input_grad(0)) {
        products.push_back(grad);
        transposed.push_back(saved[1 + i].t());
      }
      if (ctx->needs_input_grad(1 + i)) {
        grads[1 + i] = detail::linear_weight_grad(grad, gathered);
      }
    }
    const auto& grad_gathered = grad_outputs[0];
    if (ctx->needs_input_grad(0) && (grad_gathered.defined() || !products.empty())) {
      grads[0] = primitives::matmul_reduce_scatter(
          products, transposed, grad_gathered.defined() ? std::optional<at::Tensor>(grad_gathered) : std::nullopt,
          ctx->saved_data["dim"].toInt(), scope.group, ctx->saved_data["chunks"].toInt());
    }
    return grads;
  }
};

// forward: reduce_scatter(input @ weight.T, dim); backward: grad input = all_gather(grad, dim) @
// weight, decomposed (all_gather_matmul, itself differentiable), grad weight = all_gather(grad).T @
// input.
class MatmulReduceScatterFunction : public torch::autograd::Function<MatmulReduceScatterFunction> {
 public:
  static constexpr bool is_traceable = true;

  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& input,
      const at::Tensor& weight,
      int64_t dim,
      int64_t chunks,
      c10::string_view group_name,
      int64_t group_size) {
    const detail::GroupForward scope(ctx, kMatmulReduceScatter, group_name, group_size);
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["chunks"] = chunks;
    ctx->save_for_backward({input, weight});
    return matmul_reduce_scatter(input, weight, dim, scope.group, chunks);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto& grad = grad_outputs[0];
    variable_list grads(6);
    if (!grad.defined()) {
      return grads;
    }
    const auto saved = ctx->get_saved_variables();
    const auto& input = saved[0];
    const auto& weight = saved[1];
    const detail::GroupBackward scope(ctx, kMatmulReduceScatter);
    auto [gathered_grad, products] = all_gather_matmul(
        grad, {weight.t()}, ctx->saved_data["dim"].toInt(), scope.group, ctx->saved_data["chunks"].toInt());
    if (ctx->needs_input_grad(0)) {
      grads[0] = products[0];
    }
    if (ctx->needs_input_grad(1)) {
      grads[1] = detail::linear_weight_grad(gathered_grad, input);
    }
    return grads;
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>> all_gather_matmul_autograd(
    const at::Tensor& input,
    at::TensorList weights,
    int64_t dim,
    int64_t chunks,
    c10::string_view group_name,
    int64_t group_size) {
  auto results = AllGatherMatmulFunction::apply(input, weights, dim, chunks, group_name, group_size);
  return {results[0], std::vector<at::Tensor>(results.begin() + 1, results.end())};
}

at::Tensor matmul_reduce_scatter_autograd(
    const at::Tensor& input,
    const at::Tensor& weight,
    int64_t dim,
    int64_t chunks,
    c10::string_view group_name,
    int64_t group_size) {
  return MatmulReduceScatterFunction::apply(input, weight, dim, chunks, group_name, group_size);
}

} // namespace

TORCH_LIBRARY_IMPL(torch_mp, Autograd, m) {
  m.impl("all_gather_matmul", &all_gather_matmul_autograd);
  m.impl("matmul_reduce_scatter", &matmul_reduce_scatter_autograd);
}

} // namespace torch_mp
