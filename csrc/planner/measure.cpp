// torch_mp::measure_costs and torch_mp::plan for a torch::nn::Sequential: the cost table measured on
// the local device, then planner::search.
#include <torch_mp/planner.h>

#include <chrono>
#include <limits>
#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <torch/autograd.h>
#include <torch/cuda.h>
#include <torch/nn/modules/container/any.h>

namespace torch_mp {
namespace {

using Clock = std::chrono::steady_clock;

// Waits for the device's queued work (a GPU's kernels run after their launch returns), so a timer
// read after it counts them.
void synchronize(const at::Tensor& on) {
  if (on.is_cuda()) {
    torch::cuda::synchronize(on.device().index());
  }
}

double seconds_since(Clock::time_point start, const at::Tensor& on) {
  synchronize(on);
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The allocations made on this thread while installed (as the profiler's memory tracking sees them,
// CPU and CUDA alike), each with the layer charged for it; a freed one is forgotten.
struct LiveAllocations : c10::MemoryReportingInfoBase {
  std::unordered_map<void*, std::pair<int64_t, int64_t>> live; // pointer -> (bytes, layer)
  int64_t layer = 0;
  void reportMemoryUsage(void* ptr, int64_t alloc_size, size_t, size_t, c10::Device) override {
    if (alloc_size > 0) {
      live[ptr] = {alloc_size, layer};
    } else {
      live.erase(ptr);
    }
  }
  bool memoryProfilingEnabled() const override {
    return true;
  }
};

std::vector<torch::nn::AnyModule> children_of(const torch::nn::Sequential& model) {
  TORCH_CHECK_VALUE(model && !model->is_empty(), "torch_mp::plan: model is an empty Sequential; expected layers");
  return {model->begin(), model->end()};
}

struct LayerSeconds {
  std::vector<double> forward;
  std::vector<double> backward;
};

// Each child's forward and backward seconds on `input` (the fastest of three runs after a warm-up,
// so a preempted run does not count): the children run one at a time, each on its input detached
// (requiring grad past the first), and the backward goes child by child from the last, the output's
// gradient ones (the backward of output.sum(), as Python's time_layers).
LayerSeconds time_children(std::vector<torch::nn::AnyModule>& children, const at::Tensor& input) {
  const auto n = children.size();
  LayerSeconds best{std::vector<double>(n, std::numeric_limits<double>::infinity()),
                    std::vector<double>(n, std::numeric_limits<double>::infinity())};
  for (int run = 0; run < 4; ++run) {
    for (auto& child : children) {
      child.ptr()->zero_grad(true);
    }
    std::vector<at::Tensor> inputs;
    std::vector<at::Tensor> outputs;
    at::Tensor x = input;
    for (size_t i = 0; i < n; ++i) {
      x = i == 0 || !x.is_floating_point() ? x : x.detach().requires_grad_(true);
      inputs.push_back(x);
      synchronize(input);
      const auto start = Clock::now();
      outputs.push_back(children[i].forward<at::Tensor>(x));
      if (run > 0) {
        best.forward[i] = std::min(best.forward[i], seconds_since(start, input));
      }
      x = outputs.back();
    }
    TORCH_CHECK_VALUE(x.requires_grad() && x.is_floating_point(),
                      "torch_mp::plan: the model's output on sample does not require grad; expected a ",
                      "differentiable output to time the backward");
    at::Tensor gradient = at::ones_like(x);
    for (size_t i = n; i-- > 0;) {
      synchronize(input);
      const auto start = Clock::now();
      // The parameters' gradients and the input's, as in the model's backward.
      torch::autograd::backward({outputs[i]}, {gradient});
      if (run > 0) {
        best.backward[i] = std::min(best.backward[i], seconds_since(start, input));
      }
      if (i > 0) {
        gradient = inputs[i].requires_grad() && inputs[i].grad().defined() ? inputs[i].grad()
                                                                           : at::zeros_like(inputs[i]);
      }
    }
  }
  return best;
}

// Bytes each child's forward leaves saved for the backward on `sample`, each storage counted in the
// child that saves it first (a child's output that the child itself does not keep is charged to the
// next child, which receives it), and the largest child output and the model's output in bytes.
struct SavedBytes {
  std::vector<int64_t> per_layer;
  int64_t boundary = 0;
  int64_t output = 0;
};

SavedBytes saved_bytes(std::vector<torch::nn::AnyModule>& children, const at::Tensor& sample) {
  const auto n = static_cast<int64_t>(children.size());
  SavedBytes saved{std::vector<int64_t>(n, 0)};
  auto tracker = std::make_shared<LiveAllocations>();
  at::Tensor output;
  {
    c10::DebugInfoGuard guard(c10::DebugInfoKind::PROFILER_STATE, tracker);
    torch::AutoGradMode grad_mode(true);
    // A copy of the sample made while tracking, charged to the first child, which receives it.
    at::Tensor x = sample.clone();
    for (int64_t i = 0; i < n; ++i) {
      tracker->layer = i;
      x = children[i].forward<at::Tensor>(x);
      saved.boundary = std::max<int64_t>(saved.boundary, static_cast<int64_t>(x.nbytes()));
      // Held here only: the child did not keep it; if it stays alive, the next child saved it.
      auto found = x.has_storage() ? tracker->live.find(x.storage().mutable_data()) : tracker->live.end();
      if (found != tracker->live.end() && x.use_count() == 1 && x.storage().use_count() == 1 && i + 1 < n) {
        found->second.second = i + 1;
      }
    }
    output = x;
    if (output.has_storage()) {
      tracker->live.erase(output.storage().mutable_data()); // the output: output_bytes, not a layer's
    }
    for (const auto& [ptr, entry] : tracker->live) {
      saved.per_layer[entry.second] += entry.first;
    }
  }
  saved.output = output.is_floating_point() ? static_cast<int64_t>(output.nbytes()) : 0;
  return saved;
}

int64_t per_row(int64_t bytes, int64_t rows) {
  return (bytes + rows - 1) / rows;
}

} // namespace

planner::CostTable measure_costs(torch::nn::Sequential model, const at::Tensor& sample) {
  auto children = children_of(model);
  TORCH_CHECK_VALUE(sample.defined() && sample.dim() >= 1, "torch_mp::plan: sample has ",
                    sample.defined() ? sample.dim() : 0, " dims; expected a tensor whose dim 0 counts the samples");
  const int64_t rows = sample.size(0);
  TORCH_CHECK_VALUE(rows >= 1, "torch_mp::plan: sample has 0 rows; expected at least one");

  // Left as found: the gradients, the buffers (batch-norm statistics), the CPU random generator.
  std::vector<std::pair<at::Tensor, at::Tensor>> grads;
  for (auto& p : model->parameters()) {
    grads.emplace_back(p, p.grad());
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> buffers;
  for (auto& b : model->buffers()) {
    buffers.emplace_back(b, b.detach().clone());
  }
  auto generator = at::detail::getDefaultCPUGenerator();
  at::Tensor rng_state;
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    rng_state = generator.get_state();
  }
  const auto restore = [&] {
    torch::NoGradGuard no_grad;
    for (auto& [p, g] : grads) {
      p.mutable_grad() = g;
    }
    for (auto& [b, value] : buffers) {
      b.copy_(value);
    }
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(rng_state);
  };
  LayerSeconds full;
  LayerSeconds one;
  SavedBytes saved;
  try {
    full = time_children(children, sample);
    one = rows > 1 ? time_children(children, sample.narrow(0, 0, 1)) : full;
    saved = saved_bytes(children, sample);
  } catch (...) {
    restore();
    throw;
  }
  restore();

  planner::CostTable costs;
  std::unordered_set<const c10::TensorImpl*> seen;
  int64_t index = 0;
  for (const auto& item : model->named_children()) {
    costs.layers.push_back(item.key());
    const auto i = index++;
    costs.forward.push_back(planner::Line::through(one.forward[i], rows, full.forward[i]));
    costs.backward.push_back(planner::Line::through(one.backward[i], rows, full.backward[i]));
    int64_t total = 0;
    int64_t sharded = 0;
    for (const auto& p : item.value()->parameters()) {
      if (!seen.insert(p.unsafeGetTensorImpl()).second) {
        continue;
      }
      const auto nbytes = static_cast<int64_t>(p.numel() * p.element_size());
      total += nbytes;
      sharded += p.dim() >= 2 ? nbytes : 0;
    }
    costs.param_bytes.push_back(total);
    costs.sharded_param_bytes.push_back(sharded);
    costs.activation_bytes.push_back(per_row(saved.per_layer[i], rows));
  }
  const auto parameters = model->parameters();
  costs.param_element_size = parameters.empty() ? 4 : static_cast<int64_t>(parameters.front().element_size());
  costs.boundary_bytes = per_row(saved.boundary, rows);
  costs.output_bytes = per_row(saved.output, rows);
  // The loss keeps the output once more (a log-softmax over it, for cross entropy).
  costs.outside_activation_bytes = costs.output_bytes;
  costs.tp_must_divide = {1};
  costs.all_reduces_per_layer = 1;
  return costs;
}

planner::Plan plan(
    torch::nn::Sequential model,
    int64_t world_size,
    int64_t device_memory_bytes,
    int64_t batch,
    const at::Tensor& sample,
    const PlanOptions& options) {
  auto costs = measure_costs(std::move(model), sample);
  if (options.collectives()) {
    costs.alpha_s = options.collectives()->alpha_s;
    costs.beta_s_per_byte = options.collectives()->beta_s_per_byte;
  }
  return planner::search(costs, world_size, device_memory_bytes, batch,
                         planner::SearchOptions()
                             .schedules(options.schedules())
                             .max_chunks(options.max_chunks())
                             .model_name("torch::nn::Sequential"));
}

} // namespace torch_mp
