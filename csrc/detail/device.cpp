#include "detail/device.h"

#include <ATen/Context.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

namespace torch_mp::detail {
namespace {

// The number of devices of `type` this process sees, as torch.cuda.device_count() and its kin count
// them; -1 when this build of PyTorch has no such backend.
int device_count(c10::DeviceType type) {
  try {
    const auto& hooks = at::globalContext().getAcceleratorHooksInterface(type);
    return hooks.isBuilt() ? static_cast<int>(hooks.deviceCount()) : -1;
  } catch (const c10::Error&) {
    return -1;
  }
}

} // namespace

void check_device_available(c10::Device device, const char* what) {
  if (device.is_cpu() || device.is_meta()) {
    return;
  }
  const auto type_name = c10::DeviceTypeName(device.type(), /*lower_case=*/true);
  const int count = device_count(device.type());
  TORCH_CHECK_VALUE(
      count >= 0, what, ": device '", device, "' is not available: this build of PyTorch has no ",
      type_name, " support");
  TORCH_CHECK_VALUE(
      (device.has_index() ? device.index() : 0) < count, what, ": device '", device, "' is not available: this process sees ",
      count, " ", type_name, " device(s)",
      count > 0 ? " (indices 0.." + std::to_string(count - 1) + ")" : std::string());
}

c10::Device normalize_device(c10::Device device) {
  if (device.has_index() || device.is_cpu() || device.is_meta() ||
      !c10::impl::hasDeviceGuardImpl(device.type())) {
    return device;
  }
  return c10::impl::getDeviceGuardImpl(device.type())->getDevice();
}

} // namespace torch_mp::detail
