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

} // namespace torch_mp::detail
