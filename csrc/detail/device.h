#pragma once

#include <c10/core/Device.h>

namespace torch_mp::detail {

// Throws a ValueError naming `what` when `device` is not usable in this process: a backend this
// build of PyTorch lacks, or a device index past the number of devices present.
void check_device_available(c10::Device device, const char* what);

} // namespace torch_mp::detail

namespace torch_mp::detail {

// "cuda" becomes "cuda:<current index>", so that devices compare equal to the device of a tensor
// placed there; devices with a single instance (cpu, meta) stay as they are.
c10::Device normalize_device(c10::Device device);

} // namespace torch_mp::detail
