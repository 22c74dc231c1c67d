// torch_mp._C: the few C++ helpers the Python package calls directly. The operators themselves live
// in libtorch_mp, which this module links, and are reached through torch.ops.torch_mp.
#include <torch/extension.h>

#include <torch_mp/pipeline.h>
#include <torch_mp/split.h>

#include "detail/device.h"

namespace {

// Schedules cross to Python as lists (one per rank) of (backward, stage, micro-batch) tuples.
using PyAction = std::tuple<bool, int64_t, int64_t>;
using PySchedule = std::vector<std::vector<PyAction>>;

PySchedule pipeline_schedule(const std::string& kind, int64_t num_ranks, int64_t stages_per_rank, int64_t chunks) {
  namespace pp = torch_mp::pipeline;
  PySchedule result;
  for (const auto& actions : pp::make_schedule(pp::parse_schedule_kind(kind), num_ranks, stages_per_rank, chunks)) {
    auto& out = result.emplace_back();
    for (const auto& a : actions) {
      out.emplace_back(a.backward, a.stage, a.microbatch);
    }
  }
  return result;
}

void check_pipeline_schedule(const PySchedule& schedule, int64_t num_stages, int64_t chunks) {
  std::vector<std::vector<torch_mp::pipeline::Action>> actions;
  for (const auto& rank : schedule) {
    auto& out = actions.emplace_back();
    for (const auto& [backward, stage, microbatch] : rank) {
      out.push_back({backward, stage, microbatch});
    }
  }
  torch_mp::pipeline::check_schedule(actions, num_stages, chunks);
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("_pipeline_schedule", &pipeline_schedule, py::arg("kind"), py::arg("num_ranks"),
        py::arg("stages_per_rank"), py::arg("chunks"));
  m.def("_check_pipeline_schedule", &check_pipeline_schedule, py::arg("schedule"), py::arg("num_stages"),
        py::arg("chunks"));
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
