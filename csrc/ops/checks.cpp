#include "ops/checks.h"

#include <ATen/WrapDimUtils.h>
#include <c10/util/Exception.h>

namespace torch_mp::detail {

int64_t check_divisible(std::string_view op, const at::Tensor& self, int64_t dim, int64_t group_size) {
  const auto wrapped = at::maybe_wrap_dim(dim, self.dim());
  const auto size = self.sym_size(wrapped);
  if (const auto concrete = size.maybe_as_int()) {
    TORCH_CHECK_VALUE(
        *concrete % group_size == 0, op, ": input size ", *concrete, " along dim ", dim,
        " is not divisible by the group size ", group_size, "; expected a multiple of ", group_size);
  }
  return wrapped;
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

void check_same_device_and_dtype(
    std::string_view op,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias) {
  check_matches(op, "weight", input, weight);
  if (bias.has_value() && bias->defined()) {
    check_matches(op, "bias", input, *bias);
  }
}

} // namespace torch_mp::detail
