#include <torch/autograd.h>
#include <torch/library.h>

#include <torch_mp/ops.h>

#include "ops/autograd/group_function.h"
#include "ops/autograd/linear_grads.h"
#include "ops/typed_op.h"

namespace torch_mp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using DimOp = at::Tensor (*)(const at::Tensor&, int64_t, const Group&);

// forward: Forward below autograd; backward: Backward, the conjugate op (itself differentiable,
// so double backward works). `dim` is ignored by the pairs that do not take one. `Name` names the
// op in the errors of the collectives either direction runs.
template <const char* Name, DimOp Forward, DimOp Backward>
class ConjugateFunction : public torch::autograd::Function<ConjugateFunction<Name, Forward, Backward>> {
 public:
  static constexpr bool is_traceable = true;

  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& self,
      int64_t dim,
      c10::string_view group_name,
      int64_t group_size) {
    const detail::GroupForward scope(ctx, Name, group_name, group_size);
    ctx->saved_data["dim"] = dim;
    return Forward(self, dim, scope.group);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto grad = grad_outputs[0];
    if (grad.defined()) {
      const detail::GroupBackward scope(ctx, Name);
      grad = Backward(grad, ctx->saved_data["dim"].toInt(), scope.group);
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor copy_to(const at::Tensor& self, int64_t, const Group& group) {
  return copy_to_tp(self, group);
}
at::Tensor reduce_from(const at::Tensor& self, int64_t, const Group& group) {
  return reduce_from_tp(self, group);
}
// The backward of reduce_from_tp: the gradient of a replicated result is already complete.
at::Tensor identity(const at::Tensor& grad, int64_t, const Group&) {
  return grad;
}

template <const char* Name, DimOp Forward, DimOp Backward>
at::Tensor group_autograd(const at::Tensor& self, c10::string_view group_name, int64_t group_size) {
  return ConjugateFunction<Name, Forward, Backward>::apply(self, 0, group_name, group_size);
}

template <const char* Name, DimOp Forward, DimOp Backward>
at::Tensor dim_group_autograd(const at::Tensor& self, int64_t dim, c10::string_view group_name, int64_t group_size) {
  return ConjugateFunction<Name, Forward, Backward>::apply(self, dim, group_name, group_size);
}

// The gradients of weight and bias (autograd inputs 1 and 2; undefined where not needed) of a linear
// layer's local matmul, input @ weight.T + bias, whose output has gradient `grad`.
std::pair<at::Tensor, at::Tensor> weight_and_bias_grads(
    AutogradContext* ctx,
    const at::Tensor& grad,
    const at::Tensor& input,
    bool has_bias) {
  return {
      ctx->needs_input_grad(1) ? detail::linear_weight_grad(grad, input) : at::Tensor(),
      has_bias && ctx->needs_input_grad(2) ? detail::linear_bias_grad(grad) : at::Tensor()};
}

constexpr char kColumnParallelLinear[] = "torch_mp.column_parallel_linear";

// forward: x @ weight.T + bias (then all-gather when gather_output); backward: the input-gradient
// all-reduce starts, in place, before the weight-gradient matmul and is waited on after it: the two
// overlap in eager mode, and under torch.compile inductor sees the start/wait pair around the matmul.
class ColumnParallelLinearFunction : public torch::autograd::Function<ColumnParallelLinearFunction> {
 public:
  static constexpr bool is_traceable = true;

  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& input,
      const at::Tensor& weight,
      const std::optional<at::Tensor>& bias,
      bool gather_output,
      c10::string_view group_name,
      int64_t group_size) {
    const detail::GroupForward scope(ctx, kColumnParallelLinear, group_name, group_size);
    ctx->save_for_backward({input, weight});
    ctx->saved_data["gather_output"] = gather_output;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return column_parallel_linear(input, weight, bias, gather_output, scope.group);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto grad = grad_outputs[0];
    if (!grad.defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const detail::GroupBackward scope(ctx, kColumnParallelLinear);
    const auto& group = scope.group;
    const auto saved = ctx->get_saved_variables();
    if (ctx->saved_data["gather_output"].toBool()) {
      grad = primitives::shard(grad, -1, group);
    }
    const auto& input = saved[0];
    const auto& weight = saved[1];
    // Without a bias the autograd inputs are only input and weight.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    at::Tensor grad_input;
    if (ctx->needs_input_grad(0)) {
      grad_input = at::matmul(grad, weight).contiguous();
      primitives::all_reduce_start_(grad_input, "sum", group);
    }
    const auto [grad_weight, grad_bias] = weight_and_bias_grads(ctx, grad, input, has_bias);
    if (grad_input.defined()) {
      std::vector<at::Tensor> meanwhile;
      for (const auto& tensor : {grad_weight, grad_bias}) {
        if (tensor.defined()) {
          meanwhile.push_back(tensor);
        }
      }
      primitives::wait_(grad_input, meanwhile, group);
    }
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

constexpr char kRowParallelLinear[] = "torch_mp.row_parallel_linear";

// forward: all_reduce(input @ weight.T) + bias, reduced in place in the matmul's output; backward:
// the gradient of a replicated output needs no collective.
class RowParallelLinearFunction : public torch::autograd::Function<RowParallelLinearFunction> {
 public:
  static constexpr bool is_traceable = true;

  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& input,
      const at::Tensor& weight,
      const std::optional<at::Tensor>& bias,
      c10::string_view group_name,
      int64_t group_size) {
    ctx->save_for_backward({input, weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    detail::OpScope scope(kRowParallelLinear);
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = detail::typed_op<at::Tensor(
        const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, int64_t)>(
        "torch_mp::_row_parallel_linear");
    return op.call(input, weight, bias, group_name, group_size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto& grad = grad_outputs[0];
    if (!grad.defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const auto saved = ctx->get_saved_variables();
    const auto& input = saved[0];
    const auto& weight = saved[1];
    const auto grad_input = ctx->needs_input_grad(0) ? at::matmul(grad, weight) : at::Tensor();
    const auto [grad_weight, grad_bias] =
        weight_and_bias_grads(ctx, grad, input, ctx->saved_data["has_bias"].toBool());
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor()};
  }
};

at::Tensor row_parallel_linear_autograd(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    c10::string_view group_name,
    int64_t group_size) {
  return RowParallelLinearFunction::apply(input, weight, bias, group_name, group_size);
}

at::Tensor column_parallel_linear_autograd(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    bool gather_output,
    c10::string_view group_name,
    int64_t group_size) {
  return ColumnParallelLinearFunction::apply(input, weight, bias, gather_output, group_name, group_size);
}

} // namespace

constexpr char kCopyToTp[] = "torch_mp.copy_to_tp";
constexpr char kReduceFromTp[] = "torch_mp.reduce_from_tp";
constexpr char kGatherFromTp[] = "torch_mp.gather_from_tp";
constexpr char kScatterToTp[] = "torch_mp.scatter_to_tp";
constexpr char kReduceScatterToSp[] = "torch_mp.reduce_scatter_to_sp";
constexpr char kGatherFromSp[] = "torch_mp.gather_from_sp";

TORCH_LIBRARY_IMPL(torch_mp, Autograd, m) {
  m.impl("copy_to_tp", &group_autograd<kCopyToTp, copy_to, reduce_from>);
  m.impl("reduce_from_tp", &group_autograd<kReduceFromTp, reduce_from, identity>);
  m.impl("gather_from_tp", &dim_group_autograd<kGatherFromTp, gather_from_tp, scatter_to_tp>);
  m.impl("scatter_to_tp", &dim_group_autograd<kScatterToTp, scatter_to_tp, gather_from_tp>);
  m.impl("reduce_scatter_to_sp", &dim_group_autograd<kReduceScatterToSp, reduce_scatter_to_sp, gather_from_sp>);
  m.impl("gather_from_sp", &dim_group_autograd<kGatherFromSp, gather_from_sp, reduce_scatter_to_sp>);
  m.impl("column_parallel_linear", &column_parallel_linear_autograd);
  m.impl("_row_parallel_linear", &row_parallel_linear_autograd);
}

} // namespace torch_mp
