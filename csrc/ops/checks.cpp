#include "ops/checks.h"

#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include "comm/collectives.h"

namespace torch_mp::detail {

void check_group_size(std::string_view op, int64_t group_size) {
  TORCH_CHECK_VALUE(group_size >= 1, scoped_op(op), ": group_size is ", group_size, "; expected at least 1");
}

int64_t wrap_dim(std::string_view op, const at::Tensor& self, int64_t dim) {
  // A 0-dim tensor has no dim to split or gather along.
  const auto ndim = self.dim();
  TORCH_CHECK_INDEX(
      ndim > 0 && dim >= -ndim && dim < ndim, scoped_op(op), ": dim ", dim, " is out of range for an input with ", ndim,
      " dims; expected ", ndim > 0 ? "a dim in [" + std::to_string(-ndim) + ", " + std::to_string(ndim - 1) + "]"
                                   : std::string("an input with at least one dim"));
  return dim < 0 ? dim + ndim : dim;
}

int64_t check_divisible(std::string_view op, const at::Tensor& self, int64_t dim, int64_t group_size) {
  check_group_size(op, group_size);
  const auto wrapped = wrap_dim(op, self, dim);
  const auto size = self.sym_size(wrapped);
  if (const auto concrete = size.maybe_as_int()) {
    TORCH_CHECK_VALUE(
        *concrete % group_size == 0, scoped_op(op), ": input size ", *concrete, " along dim ", dim,
        " is not divisible by the group size ", group_size, "; expected a multiple of ", group_size);
  }
  return wrapped;
}

void check_all_to_all(
    std::string_view op,
    const at::Tensor& self,
    c10::IntArrayRef output_split_sizes,
    c10::IntArrayRef input_split_sizes,
    int64_t group_size) {
  check_group_size(op, group_size);
  TORCH_CHECK_VALUE(
      self.dim() >= 1, scoped_op(op), ": input is a 0-dim tensor; expected rows along dim 0 to send");
  for (const auto& [name, splits] :
       {std::pair{"output_split_sizes", output_split_sizes}, std::pair{"input_split_sizes", input_split_sizes}}) {
    TORCH_CHECK_VALUE(
        static_cast<int64_t>(splits.size()) == group_size, scoped_op(op), ": ", name, " has ", splits.size(),
        " entries; expected one per member of the group (", group_size, ")");
    for (const auto rows : splits) {
      TORCH_CHECK_VALUE(rows >= 0, scoped_op(op), ": ", name, " ", splits, " holds a negative size");
    }
  }
  const auto sent = c10::sum_integers(input_split_sizes);
  TORCH_CHECK_VALUE(
      self.sym_size(0).sym_eq(sent).expect_true(__FILE__, __LINE__), scoped_op(op), ": input_split_sizes ",
      input_split_sizes, " sum to ", sent, " but the input has ", self.sym_size(0),
      " rows (dim 0); expected them to sum to the rows sent");
}

namespace {

void check_matches(std::string_view op, const char* name, const at::Tensor& input, const at::Tensor& other) {
  TORCH_CHECK_VALUE(
      other.device() == input.device(), op, ": ", name, " is on ", other.device(), " but input is on ",
      input.device(), "; expected both on one device");
  TORCH_CHECK_TYPE(
      other.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ", other.scalar_type(),
      " but input has dtype ", input.scalar_type(), "; expected the same dtype");
}

} // namespace

void check_linear(
    std::string_view op,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    std::string_view layout) {
  TORCH_CHECK_VALUE(
      input.dim() >= 1, op, ": input is a 0-dim tensor; expected input of shape [*, in_features]");
  const bool has_bias = bias.has_value() && bias->defined();
  check_matches(op, "weight", input, weight);
  if (has_bias) {
    check_matches(op, "bias", input, *bias);
  }
  TORCH_CHECK_VALUE(
      weight.dim() == 2, op, ": weight has shape ", weight.sym_sizes(), "; expected a matrix ", layout);
  TORCH_CHECK_VALUE(
      input.sym_size(-1).sym_eq(weight.sym_size(1)).expect_true(__FILE__, __LINE__), op, ": input has ",
      input.sym_size(-1), " features (its last dim) but weight has shape ", weight.sym_sizes(),
      "; expected weight ", layout);
  TORCH_CHECK_VALUE(
      !has_bias || (bias->dim() == 1 && bias->sym_size(0).sym_eq(weight.sym_size(0)).expect_true(__FILE__, __LINE__)),
      op, ": bias has shape ", has_bias ? bias->sym_sizes() : c10::SymIntArrayRef(), "; expected [",
      weight.sym_size(0), "], one entry per row of weight");
}

namespace {

void check_chunks(std::string_view op, const c10::SymInt& rows, int64_t dim, int64_t chunks) {
  TORCH_CHECK_VALUE(chunks >= 1, op, ": chunks is ", chunks, "; expected at least 1");
  if (const auto concrete = rows.maybe_as_int()) {
    TORCH_CHECK_VALUE(
        *concrete % chunks == 0, op, ": each rank holds ", *concrete, " rows along dim ", dim,
        ", not divisible into chunks=", chunks, "; expected chunks dividing it");
  }
}

void check_not_features(std::string_view op, const at::Tensor& reference, int64_t wrapped, int64_t dim) {
  TORCH_CHECK_VALUE(
      wrapped != reference.dim() - 1, op, ": dim ", dim, " is the features dim (the last) of a tensor of shape ",
      reference.sym_sizes(), "; expected the sequence (or another row) dim");
}

} // namespace

int64_t check_all_gather_matmul(
    std::string_view op,
    const at::Tensor& input,
    at::TensorList weights,
    int64_t dim,
    int64_t chunks,
    int64_t group_size) {
  check_group_size(op, group_size);
  const auto wrapped = wrap_dim(op, input, dim);
  check_not_features(op, input, wrapped, dim);
  TORCH_CHECK_VALUE(!weights.empty(), op, ": weights is empty; expected at least one weight");
  for (const auto& weight : weights) {
    check_linear(op, input, weight, std::nullopt, "[output features on this rank, in_features]");
  }
  check_chunks(op, input.sym_size(wrapped), dim, chunks);
  return wrapped;
}

int64_t check_matmul_reduce_scatter(
    std::string_view op,
    at::TensorList inputs,
    at::TensorList weights,
    const std::optional<at::Tensor>& addend,
    int64_t dim,
    int64_t chunks,
    int64_t group_size) {
  const bool has_addend = addend.has_value() && addend->defined();
  TORCH_CHECK_VALUE(
      inputs.size() == weights.size(), op, ": ", inputs.size(), " inputs and ", weights.size(),
      " weights; expected one weight per input");
  TORCH_CHECK_VALUE(!inputs.empty() || has_addend, op, ": no input and no addend; expected at least one");
  const auto& reference = inputs.empty() ? *addend : inputs[0];
  const auto wrapped = check_divisible(op, reference, dim, group_size);
  check_not_features(op, reference, wrapped, dim);
  const auto rows_of = [](const at::Tensor& t) { return t.sym_sizes().slice(0, t.dim() - 1); };
  const auto same_rows = [&](const at::Tensor& t) {
    if (t.dim() != reference.dim()) {
      return false;
    }
    for (int64_t d = 0; d + 1 < t.dim(); ++d) {
      if (!t.sym_size(d).sym_eq(reference.sym_size(d)).expect_true(__FILE__, __LINE__)) {
        return false;
      }
    }
    return true;
  };
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_linear(op, inputs[i], weights[i], std::nullopt, "[output features, in_features on this rank]");
    TORCH_CHECK_VALUE(
        same_rows(inputs[i]), op, ": input ", i, " has shape ", inputs[i].sym_sizes(), "; expected rows ",
        rows_of(reference), " like input 0");
    TORCH_CHECK_VALUE(
        weights[i].sym_size(0).sym_eq(weights[0].sym_size(0)).expect_true(__FILE__, __LINE__), op, ": weight ", i,
        " has shape ", weights[i].sym_sizes(), "; expected ", weights[0].sym_size(0), " rows like weight 0");
  }
  if (has_addend && !inputs.empty()) {
    check_matches(op, "addend", inputs[0], *addend);
    TORCH_CHECK_VALUE(
        same_rows(*addend) && addend->sym_size(-1).sym_eq(weights[0].sym_size(0)).expect_true(__FILE__, __LINE__),
        op, ": addend has shape ", addend->sym_sizes(), "; expected the shape of the matmuls' sum, rows ",
        rows_of(reference), " and ", weights[0].sym_size(0), " features");
  }
  check_chunks(op, reference.sym_size(wrapped) / group_size, dim, chunks);
  return wrapped;
}

} // namespace torch_mp::detail
