#pragma once

#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

namespace torch_mp::detail {

// Checks that `self` splits evenly along `dim` into `group_size` blocks (symbolic sizes pass);
// returns the wrapped dim.
int64_t check_divisible(std::string_view op, const at::Tensor& self, int64_t dim, int64_t group_size);

// Checks that `weight` (and `bias`, when given) share `input`'s device and dtype, naming the argument.
void check_same_device_and_dtype(
    std::string_view op,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias);

} // namespace torch_mp::detail
