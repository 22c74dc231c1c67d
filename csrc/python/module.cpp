// torch_mp._C: the few C++ helpers the Python package calls directly. The operators themselves live
// in libtorch_mp, which this module links, and are reached through torch.ops.torch_mp.
#include <torch/extension.h>

#include <torch_mp/split.h>

#include "detail/device.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("_balance_by_size", &torch_mp::balance_by_size, py::arg("layer_bytes"), py::arg("capacities"));
  m.def("_check_device_available", &torch_mp::detail::check_device_available, py::arg("device"),
        py::arg("what"));
  m.def("_normalize_device", &torch_mp::detail::normalize_device, py::arg("device"));
#ifdef TORCH_MP_WITH_CUDA
  m.attr("_with_cuda") = true;
#else
  m.attr("_with_cuda") = false;
#endif
}
