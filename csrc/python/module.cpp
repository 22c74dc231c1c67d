// torch_mp._C: the few C++ helpers the Python package calls directly. The operators themselves live
// in libtorch_mp, which this module links, and are reached through torch.ops.torch_mp.
#include <optional>
#include <string>

#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <torch_mp/pipeline.h>
#include <torch_mp/planner.h>
#include <torch_mp/split.h>

#include "comm/collectives.h"
#include "comm/group.h"
#include "detail/device.h"

namespace {

// Schedules cross to Python as lists (one per rank) of (kind, stage, micro-batch) tuples, kind 0
// for F, 1 for B, 2 for W (so False and True still read as F and B).
using PyAction = std::tuple<int64_t, int64_t, int64_t>;
using PySchedule = std::vector<std::vector<PyAction>>;

PySchedule pipeline_schedule(const std::string& kind, int64_t num_ranks, int64_t stages_per_rank, int64_t chunks) {
  namespace pp = torch_mp::pipeline;
  PySchedule result;
  for (const auto& actions : pp::make_schedule(pp::parse_schedule_kind(kind), num_ranks, stages_per_rank, chunks)) {
    auto& out = result.emplace_back();
    for (const auto& a : actions) {
      out.emplace_back(static_cast<int64_t>(a.kind), a.stage, a.microbatch);
    }
  }
  return result;
}

std::vector<std::vector<torch_mp::pipeline::Action>> from_python(const PySchedule& schedule) {
  std::vector<std::vector<torch_mp::pipeline::Action>> actions;
  for (const auto& rank : schedule) {
    auto& out = actions.emplace_back();
    for (const auto& [kind, stage, microbatch] : rank) {
      TORCH_CHECK_VALUE(
          kind >= 0 && kind <= 2, "pipeline schedule: action (", kind, ", ", stage, ", ", microbatch,
          ") has kind ", kind, "; expected 0 (F), 1 (B) or 2 (W)");
      out.push_back({static_cast<torch_mp::pipeline::ActionKind>(kind), stage, microbatch});
    }
  }
  return actions;
}

// The planner's tables cross from Python as the objects themselves (torch_mp.CostTable,
// torch_mp._planner.model.Layout: their fields by name), layouts back as tuples of Layout's fields.
namespace planner = torch_mp::planner;

planner::Line line_of(const py::handle& line) {
  return {line.attr("fixed").cast<double>(), line.attr("per_row").cast<double>()};
}

std::optional<planner::Link> link_of(const py::handle& link) {
  if (link.is_none()) {
    return std::nullopt;
  }
  const auto pair = link.cast<std::pair<double, double>>();
  return planner::Link{pair.first, pair.second};
}

planner::CostTable cost_table_of(const py::handle& costs) {
  planner::CostTable t;
  const auto get = [&](const char* name) { return costs.attr(name); };
  t.layers = get("layers").cast<std::vector<std::string>>();
  for (const auto& line : get("forward")) {
    t.forward.push_back(line_of(line));
  }
  for (const auto& line : get("backward")) {
    t.backward.push_back(line_of(line));
  }
  t.outside_forward = line_of(get("outside_forward"));
  t.outside_backward = line_of(get("outside_backward"));
  t.param_bytes = get("param_bytes").cast<std::vector<int64_t>>();
  t.sharded_param_bytes = get("sharded_param_bytes").cast<std::vector<int64_t>>();
  t.first_param_bytes = get("first_param_bytes").cast<int64_t>();
  t.first_sharded_bytes = get("first_sharded_bytes").cast<int64_t>();
  t.last_param_bytes = get("last_param_bytes").cast<int64_t>();
  t.last_sharded_bytes = get("last_sharded_bytes").cast<int64_t>();
  t.tied_param_bytes = get("tied_param_bytes").cast<int64_t>();
  t.tied_sharded_bytes = get("tied_sharded_bytes").cast<int64_t>();
  t.activation_bytes = get("activation_bytes").cast<std::vector<int64_t>>();
  t.outside_activation_bytes = get("outside_activation_bytes").cast<int64_t>();
  t.boundary_bytes = get("boundary_bytes").cast<int64_t>();
  t.output_bytes = get("output_bytes").cast<int64_t>();
  t.param_element_size = get("param_element_size").cast<int64_t>();
  t.alpha_s = get("alpha_s").cast<double>();
  t.beta_s_per_byte = get("beta_s_per_byte").cast<double>();
  t.tp_must_divide = get("tp_must_divide").cast<std::vector<int64_t>>();
  t.all_reduces_per_layer = get("all_reduces_per_layer").cast<int64_t>();
  t.experts = get("experts").cast<int64_t>();
  t.sequence_parallel = get("sequence_parallel").cast<bool>();
  t.tp_link = link_of(get("tp_link"));
  t.dp_link = link_of(get("dp_link"));
  t.pp_link = link_of(get("pp_link"));
  t.host_cores = get("host_cores").cast<double>();
  t.host_ranks = get("host_ranks").cast<int64_t>();
  return t;
}

planner::Layout layout_of(const py::handle& layout) {
  const auto get = [&](const char* name) { return layout.attr(name); };
  return {get("pp").cast<int64_t>(), get("tp").cast<int64_t>(), get("dp").cast<int64_t>(),
          get("schedule").cast<std::string>(), get("chunks").cast<int64_t>(), get("checkpoint").cast<std::string>(),
          get("sequence_parallel").cast<bool>(), get("balance").cast<std::vector<int64_t>>(),
          get("batch").cast<int64_t>(), get("fully_shard").cast<bool>()};
}

py::tuple layout_fields(const planner::Layout& l) {
  return py::make_tuple(l.pp, l.tp, l.dp, l.schedule, l.chunks, l.checkpoint, l.sequence_parallel,
                        py::tuple(py::cast(l.balance)), l.batch, l.fully_shard);
}

py::tuple candidate_fields(const planner::Candidate& c) {
  return py::make_tuple(layout_fields(c.layout), c.step_s, py::tuple(py::cast(c.peak_bytes)), c.reason);
}

py::list candidates_fields(const std::vector<planner::Candidate>& candidates) {
  py::list out;
  for (const auto& c : candidates) {
    out.append(candidate_fields(c));
  }
  return out;
}

PyObject* collective_error_type = nullptr;

// torch's error translation (also at the end of a backward pass) raises a PyTorchError as its
// python_type(): the one way a C++ error reaches Python as a class of ours.
struct PythonCollectiveError : torch::PyTorchError {
  using PyTorchError::PyTorchError;
  PyObject* python_type() override {
    return collective_error_type;
  }
};

[[noreturn]] void throw_python_collective_error(const std::string& message) {
  throw PythonCollectiveError(message);
}

// `with _op_scope("torch_mp.tensor_parallel"):` names that function in the errors of the
// collectives it runs through the operators.
class PythonOpScope {
 public:
  explicit PythonOpScope(std::string op) : op_(std::move(op)) {}
  void enter() {
    scope_.emplace(op_);
  }
  void exit(const py::args&) {
    scope_.reset();
  }

 private:
  std::string op_;
  std::optional<torch_mp::detail::OpScope> scope_;
};

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("_pipeline_schedule", &pipeline_schedule, py::arg("kind"), py::arg("num_ranks"),
        py::arg("stages_per_rank"), py::arg("chunks"));
  m.def("_check_pipeline_schedule", [](const PySchedule& schedule, int64_t num_stages, int64_t chunks) {
    torch_mp::pipeline::check_schedule(from_python(schedule), num_stages, chunks);
  }, py::arg("schedule"), py::arg("num_stages"), py::arg("chunks"));
  m.def("_check_pipeline_schedule", [](const PySchedule& schedule, const std::vector<int64_t>& stage_ranks,
                                       int64_t chunks) {
    torch_mp::pipeline::check_schedule(from_python(schedule), stage_ranks, chunks);
  }, py::arg("schedule"), py::arg("stage_ranks"), py::arg("chunks"));
  m.def("_pipeline_stage_ranks", [](const std::string& kind, int64_t num_ranks, int64_t stages_per_rank) {
    namespace pp = torch_mp::pipeline;
    return pp::stage_ranks(pp::parse_schedule_kind(kind), num_ranks, stages_per_rank);
  }, py::arg("kind"), py::arg("num_ranks"), py::arg("stages_per_rank"));
  m.def("_pipeline_action_name", [](int64_t kind, int64_t stage, int64_t microbatch) {
    return torch_mp::pipeline::to_string({static_cast<torch_mp::pipeline::ActionKind>(kind), stage, microbatch});
  }, py::arg("kind"), py::arg("stage"), py::arg("microbatch"));
  // The W of a zero-bubble schedule; the GIL is released while the weight gradients are computed.
  m.def("_run_weight_gradients", &torch_mp::pipeline::run_weight_gradients, py::arg("slot"),
        py::call_guard<py::gil_scoped_release>());
  m.def("_pending_weight_gradients", &torch_mp::pipeline::pending_weight_gradients, py::arg("slot"));
  m.def("_allocate_weight_gradient_slots", &torch_mp::pipeline::allocate_weight_gradient_slots, py::arg("count"));
  m.def("_discard_weight_gradients", &torch_mp::pipeline::discard_weight_gradients, py::arg("slot"));
  m.def("_balance_by_size", &torch_mp::balance_by_size, py::arg("layer_bytes"), py::arg("capacities"));
  // The planner (torch_mp/planner.h): Python's torch_mp._planner wraps these.
  m.def("_plan_stage_peaks", [](const py::object& costs, const py::object& layout) {
    std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> out;
    for (const auto& p : planner::stage_peaks(cost_table_of(costs), layout_of(layout))) {
      out.emplace_back(p.parameters, p.gradients, p.optimizer, p.flat, p.activations);
    }
    return out;
  }, py::arg("costs"), py::arg("layout"));
  m.def("_plan_peak_bytes", [](const py::object& costs, const py::object& layout) {
    return planner::peak_bytes(cost_table_of(costs), layout_of(layout));
  }, py::arg("costs"), py::arg("layout"));
  m.def("_plan_stage_times", [](const py::object& costs, const py::object& layout) {
    const auto t = planner::stage_times(cost_table_of(costs), layout_of(layout));
    return std::make_tuple(t.forward, t.backward, t.weight);
  }, py::arg("costs"), py::arg("layout"));
  m.def("_plan_step_seconds", [](const py::object& costs, const py::object& layout) {
    return planner::step_seconds(cost_table_of(costs), layout_of(layout));
  }, py::arg("costs"), py::arg("layout"));
  m.def("_plan_simulate", [](const std::string& schedule, int64_t ranks, int64_t chunks,
                             const std::vector<double>& forward, const std::vector<double>& backward,
                             const std::vector<double>& weight, double send_s, const std::vector<double>& speedup) {
    return planner::simulate(schedule, ranks, chunks, {forward, backward, weight}, send_s, speedup);
  }, py::arg("schedule"), py::arg("ranks"), py::arg("chunks"), py::arg("forward"), py::arg("backward"),
     py::arg("weight"), py::arg("send_s"), py::arg("speedup") = std::vector<double>{});
  m.def("_plan_layouts", [](const py::object& costs, int64_t world_size, int64_t batch,
                            const std::vector<std::string>& schedules, int64_t max_chunks,
                            const std::vector<std::string>& checkpoints) {
    py::list out;
    for (const auto& l : planner::layouts(cost_table_of(costs), world_size, batch, schedules, max_chunks, checkpoints)) {
      out.append(layout_fields(l));
    }
    return out;
  }, py::arg("costs"), py::arg("world_size"), py::arg("batch"), py::arg("schedules"), py::arg("max_chunks"),
     py::arg("checkpoints"));
  // (chosen, alternatives, rejected), each candidate (layout fields, step_s, peak_bytes, reason).
  m.def("_plan_search", [](const py::object& costs, int64_t world_size, int64_t device_memory, int64_t batch,
                           const std::vector<std::string>& schedules, int64_t max_chunks,
                           const std::string& model_name, std::optional<int64_t> chosen) {
    const auto p = planner::search(cost_table_of(costs), world_size, device_memory, batch,
                                   planner::SearchOptions().schedules(schedules).max_chunks(max_chunks)
                                       .model_name(model_name).chosen(chosen));
    return py::make_tuple(candidate_fields(p.chosen), candidates_fields(p.alternatives),
                          candidates_fields(p.rejected));
  }, py::arg("costs"), py::arg("world_size"), py::arg("device_memory"), py::arg("batch"), py::arg("schedules"),
     py::arg("max_chunks"), py::arg("model_name"), py::arg("chosen") = py::none());
  m.def("_plan_format_bytes", &planner::format_bytes, py::arg("nbytes"));
  m.def("_check_device_available", &torch_mp::detail::check_device_available, py::arg("device"),
        py::arg("what"));
  m.def("_normalize_device", &torch_mp::detail::normalize_device, py::arg("device"));
  // Seconds the group's backend waits for work on `device`; None where torch_mp leaves the bound to it.
  m.def("_group_timeout", [](const std::string& group_name, int64_t group_size, c10::Device device) {
    const auto group = torch_mp::detail::resolve_group("torch_mp.pipeline", group_name, group_size);
    const auto timeout = torch_mp::detail::timeout_of(*group, device.type());
    return timeout ? std::optional<double>(static_cast<double>(timeout->count()) / 1000.0) : std::nullopt;
  }, py::arg("group_name"), py::arg("group_size"), py::arg("device"));

  const auto base = py::module_::import("torch.distributed").attr("DistBackendError");
  collective_error_type = PyErr_NewExceptionWithDoc(
      "torch_mp.CollectiveError",
      "A collective of torch_mp's did not complete: no answer within the group's timeout, or the backend "
      "failed (a peer rank died or left, a connection closed). The message names the torch_mp operator "
      "(with \"backward\" when its backward ran it), the collective, the group and this rank. A subclass of "
      "torch.distributed.DistBackendError, so code that handles c10d's failures handles it too. The group "
      "is not usable afterwards: destroy the process group and restart the ranks (torchrun's elastic "
      "restart does), resuming from the last checkpoint. The timeout is the group's own "
      "(init_process_group(timeout=...) or new_group(timeout=...)); pipeline() takes timeout= in seconds.",
      base.ptr(), nullptr);
  m.attr("CollectiveError") = py::handle(collective_error_type);
  torch_mp::detail::set_collective_error_thrower(&throw_python_collective_error);

  py::class_<PythonOpScope>(m, "_op_scope")
      .def(py::init<std::string>(), py::arg("op"))
      .def("__enter__", &PythonOpScope::enter)
      .def("__exit__", &PythonOpScope::exit);
#ifdef TORCH_MP_WITH_CUDA
  m.attr("_with_cuda") = true;
#else
  m.attr("_with_cuda") = false;
#endif
}
