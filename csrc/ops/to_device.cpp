// to_device: the inter-device transfer. Forward copies to `device`; the autograd formula
// (autograd/to_device.cpp) sends the gradient back to the source device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <torch_mp/ops.h>

#include "detail/device.h"
#include "ops/typed_op.h"

namespace torch_mp {

at::Tensor to_device(const at::Tensor& self, at::Device device, bool non_blocking) {
  static const auto op = detail::typed_op<decltype(to_device)>("torch_mp::to_device");
  return op.call(self, device, non_blocking);
}

namespace {

// One kernel for every backend: _to_copy always returns a fresh tensor, so the output never aliases
// the input, even when `self` is already on `device`. It is registered per backend rather than as
// CompositeExplicitAutograd because the fake kernel must be the Python one (torch_mp/_ops.py): only
// it can put the output on another device than the input.
at::Tensor to_device_kernel(const at::Tensor& self, at::Device device, bool non_blocking) {
  detail::check_device_available(device, "torch_mp.to_device(device=...)");
  return at::_to_copy(self, at::TensorOptions().device(device), non_blocking);
}

} // namespace

TORCH_LIBRARY_FRAGMENT(torch_mp, m) {
  const std::vector<at::Tag> pt2_compliant{at::Tag::pt2_compliant_tag};
  m.def("to_device(Tensor self, Device device, bool non_blocking=False) -> Tensor", pt2_compliant);
}

TORCH_LIBRARY_IMPL(torch_mp, CPU, m) {
  m.impl("to_device", &to_device_kernel);
}
TORCH_LIBRARY_IMPL(torch_mp, CUDA, m) {
  m.impl("to_device", &to_device_kernel);
}
TORCH_LIBRARY_IMPL(torch_mp, XPU, m) {
  m.impl("to_device", &to_device_kernel);
}
TORCH_LIBRARY_IMPL(torch_mp, MPS, m) {
  m.impl("to_device", &to_device_kernel);
}
TORCH_LIBRARY_IMPL(torch_mp, PrivateUse1, m) {
  m.impl("to_device", &to_device_kernel);
}

} // namespace torch_mp
