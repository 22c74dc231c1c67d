#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace torch_mp {

// Copies `self` to `device` and returns the copy, always a fresh tensor (also when `self` is already
// there). Backward: the gradient goes back to the device `self` came from.
// The same operator is torch.ops.torch_mp.to_device in Python.
at::Tensor to_device(const at::Tensor& self, at::Device device, bool non_blocking = false);

} // namespace torch_mp
