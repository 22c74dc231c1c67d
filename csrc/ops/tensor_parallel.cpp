// Tensor-parallel operators: the conjugate pairs, the parallel linear layers' matmuls, the
// vocabulary-parallel embedding and cross entropy. Autograd: autograd/tensor_parallel.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <torch_mp/ops.h>

#include "comm/collectives.h"
#include "comm/group.h"
#include "ops/checks.h"
#include "ops/typed_op.h"

namespace torch_mp {

using GroupOp = at::Tensor(const at::Tensor&, c10::string_view, int64_t);
using DimGroupOp = at::Tensor(const at::Tensor&, int64_t, c10::string_view, int64_t);
using LinearOp = at::Tensor(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool, c10::string_view, int64_t);

at::Tensor copy_to_tp(const at::Tensor& self, const Group& group) {
  static const auto op = detail::typed_op<GroupOp>("torch_mp::copy_to_tp");
  return op.call(self, group.name, group.size);
}

at::Tensor reduce_from_tp(const at::Tensor& self, const Group& group) {
  static const auto op = detail::typed_op<GroupOp>("torch_mp::reduce_from_tp");
  return op.call(self, group.name, group.size);
}

at::Tensor gather_from_tp(const at::Tensor& self, int64_t dim, const Group& group) {
  static const auto op = detail::typed_op<DimGroupOp>("torch_mp::gather_from_tp");
  return op.call(self, dim, group.name, group.size);
}

at::Tensor scatter_to_tp(const at::Tensor& self, int64_t dim, const Group& group) {
  static const auto op = detail::typed_op<DimGroupOp>("torch_mp::scatter_to_tp");
  return op.call(self, dim, group.name, group.size);
}

at::Tensor reduce_scatter_to_sp(const at::Tensor& self, int64_t dim, const Group& group) {
  static const auto op = detail::typed_op<DimGroupOp>("torch_mp::reduce_scatter_to_sp");
  return op.call(self, dim, group.name, group.size);
}

at::Tensor gather_from_sp(const at::Tensor& self, int64_t dim, const Group& group) {
  static const auto op = detail::typed_op<DimGroupOp>("torch_mp::gather_from_sp");
  return op.call(self, dim, group.name, group.size);
}

at::Tensor column_parallel_linear(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    bool gather_output,
    const Group& group) {
  static const auto op = detail::typed_op<LinearOp>("torch_mp::column_parallel_linear");
  return op.call(input, weight, bias, gather_output, group.name, group.size);
}

at::Tensor row_parallel_linear(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    bool input_is_parallel,
    const Group& group) {
  static const auto op = detail::typed_op<LinearOp>("torch_mp::row_parallel_linear");
  return op.call(input, weight, bias, input_is_parallel, group.name, group.size);
}

at::Tensor vocab_parallel_embedding(
    const at::Tensor& input,
    const at::Tensor& weight,
    int64_t vocab_start,
    const Group& group) {
  static const auto op =
      detail::typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, c10::string_view, int64_t)>(
          "torch_mp::vocab_parallel_embedding");
  return op.call(input, weight, vocab_start, group.name, group.size);
}

at::Tensor vocab_parallel_cross_entropy(
    const at::Tensor& logits,
    const at::Tensor& target,
    int64_t vocab_start,
    int64_t ignore_index,
    const Group& group) {
  static const auto op =
      detail::typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, c10::string_view, int64_t)>(
          "torch_mp::vocab_parallel_cross_entropy");
  return op.call(logits, target, vocab_start, ignore_index, group.name, group.size);
}

namespace {

Group group_of(c10::string_view name, int64_t size) {
  return Group{std::string(name), size, 0};
}

// --- forward kernels of the conjugate pairs: one primitive each ----------------------------------

// The forward needs no group, but a group that does not exist should fail here, not in backward.
at::Tensor copy_to_tp_kernel(const at::Tensor& self, c10::string_view name, int64_t size) {
  detail::check_group_size("torch_mp.copy_to_tp", size);
  if (size > 1) {
    detail::resolve_group("torch_mp.copy_to_tp", name, size);
  }
  return self.clone();
}
at::Tensor reduce_from_tp_kernel(const at::Tensor& self, c10::string_view name, int64_t size) {
  return primitives::all_reduce(self, "sum", group_of(name, size));
}
at::Tensor gather_from_tp_kernel(const at::Tensor& self, int64_t dim, c10::string_view name, int64_t size) {
  return primitives::all_gather(self, dim, group_of(name, size));
}
at::Tensor scatter_to_tp_kernel(const at::Tensor& self, int64_t dim, c10::string_view name, int64_t size) {
  return primitives::shard(self, dim, group_of(name, size));
}
at::Tensor reduce_scatter_to_sp_kernel(const at::Tensor& self, int64_t dim, c10::string_view name, int64_t size) {
  return primitives::reduce_scatter(self, dim, group_of(name, size));
}
at::Tensor gather_from_sp_kernel(const at::Tensor& self, int64_t dim, c10::string_view name, int64_t size) {
  return primitives::all_gather(self, dim, group_of(name, size));
}

// --- column-parallel linear -------------------------------------------------------------------

at::Tensor column_parallel_linear_kernel(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    bool gather_output,
    c10::string_view name,
    int64_t size) {
  detail::check_linear(
      "torch_mp.column_parallel_linear", input, weight, bias, "[out_features / group size, in_features]");
  auto output = at::linear(input, weight, bias);
  return gather_output ? primitives::all_gather(output, -1, group_of(name, size)) : output;
}

// --- row-parallel linear -------------------------------------------------------------------------

// all_reduce(input @ weight.T) + bias, reduced in place in the matmul's own output: no copy.
at::Tensor _row_parallel_linear_kernel(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    c10::string_view name,
    int64_t size) {
  detail::check_group_size("torch_mp.row_parallel_linear", size);
  auto output = at::linear(input, weight).contiguous();
  const auto group = group_of(name, size);
  primitives::all_reduce_start_(output, "sum", group);
  primitives::wait_(output, {}, group);
  if (bias.has_value() && bias->defined()) {
    output.add_(*bias);
  }
  return output;
}

// --- compositions: autograd comes from the ops they call ---------------------------------------

at::Tensor row_parallel_linear_kernel(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    bool input_is_parallel,
    c10::string_view name,
    int64_t size) {
  detail::OpScope scope("torch_mp.row_parallel_linear");
  const auto group = group_of(name, size);
  const auto local_input = input_is_parallel ? input : scatter_to_tp(input, -1, group);
  detail::check_linear(
      "torch_mp.row_parallel_linear", local_input, weight, bias,
      input_is_parallel ? "[out_features, in_features / group size] (input holds this rank's features)"
                        : "[out_features, in_features / group size] (this rank's slice of the input's features)");
  static const auto op = detail::typed_op<at::Tensor(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, int64_t)>(
      "torch_mp::_row_parallel_linear");
  return op.call(local_input, weight, bias, name, size);
}

at::Tensor vocab_parallel_embedding_kernel(
    const at::Tensor& input,
    const at::Tensor& weight,
    int64_t vocab_start,
    c10::string_view name,
    int64_t size) {
  detail::OpScope scope("torch_mp.vocab_parallel_embedding");
  TORCH_CHECK_TYPE(
      at::isIntegralType(input.scalar_type(), /*includeBool=*/false),
      "torch_mp.vocab_parallel_embedding: input has dtype ", input.scalar_type(), "; expected integer indices");
  TORCH_CHECK_VALUE(
      weight.dim() == 2, "torch_mp.vocab_parallel_embedding: weight has ", weight.dim(),
      " dims; expected [vocab rows on this rank, embedding dim]");
  const auto outside = (input < vocab_start) | (input >= vocab_start + weight.size(0));
  const auto local = (input - vocab_start).masked_fill(outside, 0);
  auto output = at::embedding(weight, local).masked_fill(outside.unsqueeze(-1), 0);
  return reduce_from_tp(output, group_of(name, size));
}

at::Tensor vocab_parallel_cross_entropy_kernel(
    const at::Tensor& logits,
    const at::Tensor& target,
    int64_t vocab_start,
    int64_t ignore_index,
    c10::string_view name,
    int64_t size) {
  detail::OpScope scope("torch_mp.vocab_parallel_cross_entropy");
  TORCH_CHECK_TYPE(
      at::isFloatingType(logits.scalar_type()), "torch_mp.vocab_parallel_cross_entropy: logits has dtype ",
      logits.scalar_type(), "; expected a floating point dtype");
  TORCH_CHECK_TYPE(
      at::isIntegralType(target.scalar_type(), /*includeBool=*/false),
      "torch_mp.vocab_parallel_cross_entropy: target has dtype ", target.scalar_type(),
      "; expected integer class indices");
  c10::SymBool shapes_fit(logits.dim() == target.dim() + 1);
  for (int64_t d = 0; d < target.dim() && d + 1 < logits.dim(); ++d) {
    shapes_fit = shapes_fit.sym_and(logits.sym_size(d).sym_eq(target.sym_size(d)));
  }
  TORCH_CHECK_VALUE(
      shapes_fit.expect_true(__FILE__, __LINE__), "torch_mp.vocab_parallel_cross_entropy: logits of shape ", logits.sym_sizes(),
      " and target of shape ", target.sym_sizes(), "; expected logits of shape [*target.shape, vocab on this rank]");
  // The vocabulary shard is as wide as the weight it came from: a static size.
  const auto local_vocab = logits.sym_size(-1).guard_int(__FILE__, __LINE__);
  const auto group = group_of(name, size);
  // Reduced-precision logits are summed in float32, as torch's cross entropy does internally.
  const auto values = at::isReducedFloatingType(logits.scalar_type()) ? logits.to(at::kFloat) : logits;
  const auto max = primitives::all_reduce(std::get<0>(values.detach().max(-1, true)), "max", group);
  const auto shifted = values - max;
  const auto in_shard = (target >= vocab_start) & (target < vocab_start + local_vocab);
  const auto local_target = (target - vocab_start).masked_fill(~in_shard, 0);
  const auto target_logit = reduce_from_tp(
      shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~in_shard, 0), group);
  const auto sum_exp = reduce_from_tp(shifted.exp().sum(-1), group);
  return (sum_exp.log() - target_logit).masked_fill(target == ignore_index, 0);
}

} // namespace

TORCH_LIBRARY_FRAGMENT(torch_mp, m) {
  const std::vector<at::Tag> pt2_compliant{at::Tag::pt2_compliant_tag};
  m.def("copy_to_tp(Tensor self, str group_name, int group_size) -> Tensor", pt2_compliant);
  m.def("reduce_from_tp(Tensor self, str group_name, int group_size) -> Tensor", pt2_compliant);
  m.def("gather_from_tp(Tensor self, int dim, str group_name, int group_size) -> Tensor", pt2_compliant);
  m.def("scatter_to_tp(Tensor self, int dim, str group_name, int group_size) -> Tensor", pt2_compliant);
  m.def("reduce_scatter_to_sp(Tensor self, int dim, str group_name, int group_size) -> Tensor", pt2_compliant);
  m.def("gather_from_sp(Tensor self, int dim, str group_name, int group_size) -> Tensor", pt2_compliant);
  m.def(
      "column_parallel_linear(Tensor input, Tensor weight, Tensor? bias, bool gather_output, "
      "str group_name, int group_size) -> Tensor", pt2_compliant);
  m.def(
      "_row_parallel_linear(Tensor input, Tensor weight, Tensor? bias, str group_name, int group_size) -> Tensor",
      pt2_compliant);
  m.def(
      "row_parallel_linear(Tensor input, Tensor weight, Tensor? bias, bool input_is_parallel, "
      "str group_name, int group_size) -> Tensor", pt2_compliant);
  m.def(
      "vocab_parallel_embedding(Tensor input, Tensor weight, int vocab_start, str group_name, "
      "int group_size) -> Tensor", pt2_compliant);
  m.def(
      "vocab_parallel_cross_entropy(Tensor logits, Tensor target, int vocab_start, int ignore_index, "
      "str group_name, int group_size) -> Tensor", pt2_compliant);
}

TORCH_LIBRARY_IMPL(torch_mp, CompositeExplicitAutograd, m) {
  m.impl("copy_to_tp", &copy_to_tp_kernel);
  m.impl("reduce_from_tp", &reduce_from_tp_kernel);
  m.impl("gather_from_tp", &gather_from_tp_kernel);
  m.impl("scatter_to_tp", &scatter_to_tp_kernel);
  m.impl("reduce_scatter_to_sp", &reduce_scatter_to_sp_kernel);
  m.impl("gather_from_sp", &gather_from_sp_kernel);
  m.impl("column_parallel_linear", &column_parallel_linear_kernel);
  m.impl("_row_parallel_linear", &_row_parallel_linear_kernel);
}

TORCH_LIBRARY_IMPL(torch_mp, CompositeImplicitAutograd, m) {
  m.impl("row_parallel_linear", &row_parallel_linear_kernel);
  m.impl("vocab_parallel_embedding", &vocab_parallel_embedding_kernel);
  m.impl("vocab_parallel_cross_entropy", &vocab_parallel_cross_entropy_kernel);
}

} // namespace torch_mp
