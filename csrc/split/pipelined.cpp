// The pipelined side of SplitSequential: a thread per stage, micro-batches handed between them.
#include <torch_mp/split.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/nn/modules/linear.h>
#include <torch_mp/ops.h>
#include <torch_mp/pipeline.h>

#include "detail/stage.h"

namespace torch_mp {
namespace {

// What one stage hands the next (activations) or the previous (gradients).
struct Message {
  at::Tensor tensor;
  bool requires_grad = false;
  std::optional<c10::Event> ready;  // on a GPU: the work that made `tensor`
};

// Thrown in a stage thread when another stage failed: the other error is the one reported.
struct Aborted : std::exception {};

class Mailbox {
 public:
  using Key = std::tuple<bool, size_t, int64_t>; // (gradient, receiving stage, micro-batch)

  void put(const Key& key, Message message) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      box_.emplace(key, std::move(message));
    }
    ready_.notify_all();
  }

  Message take(const Key& key) {
    std::unique_lock<std::mutex> lock(mutex_);
    ready_.wait(lock, [&] { return failed_ || box_.count(key) > 0; });
    if (box_.count(key) == 0) {
      throw Aborted();
    }
    auto message = std::move(box_.at(key));
    box_.erase(key);
    return message;
  }

  void fail() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      failed_ = true;
    }
    ready_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::map<Key, Message> box_;
  bool failed_ = false;
};

// Moves `tensor` to `device` for another stage's thread; on a GPU the receiver's stream waits for
// the copy through an event.
Message hand_over(const at::Tensor& tensor, c10::Device device, bool keep_graph) {
  Message message;
  message.requires_grad = tensor.requires_grad();
  message.tensor = keep_graph ? (tensor.device() == device ? tensor : torch_mp::to_device(tensor, device))
                              : tensor.detach().to(device);
  if (device.type() != c10::DeviceType::CPU) {
    c10::impl::VirtualGuardImpl guard(device.type());
    message.ready.emplace(device.type());
    message.ready->record(guard.getStream(device));
  }
  return message;
}

at::Tensor receive(Message& message, c10::Device device) {
  if (message.ready) {
    c10::impl::VirtualGuardImpl guard(device.type());
    message.ready->block(guard.getStream(device));
  }
  return message.tensor;
}

// Runs body(stage) on a thread per stage, each with the caller's thread-local state (grad mode,
// autocast ...) and intra-op thread count and, on a GPU, a stream of its own; rethrows the first
// real failure.
template <typename Body>
void on_stage_threads(size_t num_stages, const std::vector<c10::Device>& devices, Mailbox& mailbox, Body body) {
  at::ThreadLocalState state;
  // OpenMP's thread count is per thread: a new thread would start a team of every core's threads.
  const int intra_op_threads = at::get_num_threads();
  std::vector<std::exception_ptr> errors(num_stages);
  std::vector<std::thread> threads;
  for (size_t stage = 0; stage < num_stages; ++stage) {
    threads.emplace_back([&, stage] {
      try {
        at::ThreadLocalStateGuard state_guard(state);
        at::set_num_threads(intra_op_threads);
        std::optional<c10::StreamGuard> stream_guard;
        if (devices[stage].type() != c10::DeviceType::CPU) {
          c10::impl::VirtualGuardImpl guard(devices[stage].type());
          stream_guard.emplace(guard.getStreamFromGlobalPool(devices[stage]));
        }
        body(stage);
        if (stream_guard) {
          stream_guard->current_stream().synchronize();
        }
      } catch (const Aborted&) {
      } catch (...) {
        errors[stage] = std::current_exception();
        mailbox.fail();
      }
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }
  for (const auto& error : errors) {
    if (error) {
      std::rethrow_exception(error);
    }
  }
}

} // namespace

at::Tensor SplitSequentialImpl::run_stage(size_t stage, at::Tensor input, int64_t slot) {
  return detail::run_layers(layers_, stages_[stage].first, stages_[stage].second, std::move(input), slot);
}

std::vector<c10::Device> SplitSequentialImpl::stage_devices() const {
  std::vector<c10::Device> devices;
  for (const auto& stage : stages_) {
    devices.push_back(layer_devices_[stage.first]);
  }
  return devices;
}

std::vector<at::Tensor> SplitSequentialImpl::micro_batches(const at::Tensor& tensor, const char* what) const {
  TORCH_CHECK_VALUE(tensor.dim() >= 1, "split: ", what, " is a scalar; expected a batch along dim 0");
  TORCH_CHECK_VALUE(
      options_.chunks() <= tensor.size(0), "split: chunks = ", options_.chunks(), " but the ", what,
      " batch holds ", tensor.size(0), " samples; expected chunks <= the batch size");
  return tensor.tensor_split(options_.chunks(), 0);
}

at::Tensor SplitSequentialImpl::pipelined_forward(const at::Tensor& input) {
  const auto inputs = micro_batches(input, "input");
  const auto num_stages = stages_.size();
  const auto devices = stage_devices();
  std::vector<at::Tensor> outputs(inputs.size());
  Mailbox mailbox;
  on_stage_threads(num_stages, devices, mailbox, [&](size_t stage) {
    for (int64_t m = 0; m < static_cast<int64_t>(inputs.size()); ++m) {
      at::Tensor x = inputs[m];
      if (stage > 0) {
        auto message = mailbox.take({false, stage, m});
        x = receive(message, devices[stage]);
      } else if (x.device() != devices[0]) {
        x = torch_mp::to_device(x, devices[0]);
      }
      auto y = run_stage(stage, x);
      if (stage + 1 < num_stages) {
        mailbox.put({false, stage + 1, m}, hand_over(y, devices[stage + 1], true));
      } else {
        outputs[m] = y;
      }
    }
  });
  auto output = torch::cat(outputs, 0);
  return output.device() == output_device_ ? output : torch_mp::to_device(output, output_device_);
}

at::Tensor SplitSequentialImpl::train_step(
    const at::Tensor& input,
    const at::Tensor& target,
    const LossFunction& loss_fn,
    std::vector<pipeline::TimelineEvent>* timeline) {
  TORCH_CHECK_VALUE(loss_fn != nullptr, "split: train_step got an empty loss_fn; expected a loss function");
  const auto inputs = micro_batches(input, "input");
  const auto targets = micro_batches(target, "target");
  TORCH_CHECK_VALUE(
      input.size(0) == target.size(0), "split: train_step got ", input.size(0), " inputs but ", target.size(0),
      " targets; expected one target per sample along dim 0");
  const auto chunks = static_cast<int64_t>(inputs.size());
  const auto num_stages = stages_.size();
  const auto devices = stage_devices();
  const auto kind = pipeline::parse_schedule_kind(options_.schedule());
  const auto schedule = pipeline::make_schedule(kind, static_cast<int64_t>(num_stages), 1, chunks);
  // Zero bubble: the slot of (stage, micro-batch) holds its linears' weight gradients until its W.
  const auto zero_bubble = kind == pipeline::ScheduleKind::ZeroBubbleH1;
  const auto first_slot =
      zero_bubble ? pipeline::allocate_weight_gradient_slots(static_cast<int64_t>(num_stages) * chunks) : -1;
  auto slot_of = [&](size_t stage, int64_t m) {
    return zero_bubble ? first_slot + static_cast<int64_t>(stage) * chunks + m : int64_t{-1};
  };
  const auto& policy = options_.checkpoint();
  auto recompute = [&](int64_t m) { return policy == "always" || (policy == "except_last" && m < chunks - 1); };

  std::vector<at::Tensor> losses(chunks);
  Mailbox mailbox;
  detail::Recorder recorder(timeline);
  // A step that fails leaves no weight-gradient work queued behind it.
  struct DiscardOnFailure {
    int64_t first, count;
    ~DiscardOnFailure() {
      if (std::uncaught_exceptions() > 0) {
        for (int64_t slot = first; slot < first + count; ++slot) {
          pipeline::discard_weight_gradients(slot);
        }
      }
    }
  } discard_on_failure{first_slot, zero_bubble ? static_cast<int64_t>(num_stages) * chunks : 0};
  detail::HeldPostAccumulateHooks held(named_parameters(), chunks, "split");
  on_stage_threads(num_stages, devices, mailbox, [&](size_t stage) {
    const bool last = stage + 1 == num_stages;
    // Per micro-batch: the stage's input (a leaf), its output (or weighted loss on the last stage;
    // undefined when it is recomputed), and whether the next stage will send a gradient back.
    std::map<int64_t, std::tuple<at::Tensor, at::Tensor, bool>> saved;
    auto forward = [&](const at::Tensor& x, int64_t m) {
      auto y = run_stage(stage, x, slot_of(stage, m));
      if (!last) {
        return y;
      }
      auto loss = loss_fn(y, targets[m].to(devices[stage]));
      TORCH_CHECK_VALUE(
          loss.dim() == 0, "split: loss_fn returned a tensor of shape ", loss.sizes(),
          "; expected a scalar, the micro-batch's mean loss");
      losses[m] = loss.detach();
      return loss * (static_cast<double>(inputs[m].size(0)) / static_cast<double>(input.size(0)));
    };
    auto take = [&](bool gradient, int64_t m) {
      return recorder.record(static_cast<int64_t>(stage), "recv-wait", m, [&] {
        auto message = mailbox.take({gradient, stage, m});
        return std::make_pair(receive(message, devices[stage]), message.requires_grad);
      });
    };
    auto run_forward = [&](int64_t m) {
      at::Tensor x;
      if (stage == 0) {
        x = inputs[m].to(devices[0]);
      } else {
        auto [tensor, requires_grad] = take(false, m);
        x = tensor.requires_grad_(requires_grad);
      }
      at::Tensor y;
      if (recompute(m)) {
        torch::NoGradGuard no_grad;
        y = forward(x, m);
      } else {
        y = forward(x, m);
      }
      // A recomputed output has no graph yet; it will have one in backward if grad mode is on.
      const bool answered = !last && (recompute(m) ? torch::GradMode::is_enabled() : y.requires_grad());
      if (!last) {
        auto message = hand_over(y, devices[stage + 1], false);
        message.requires_grad = answered;
        mailbox.put({false, stage + 1, m}, std::move(message));
      }
      saved[m] = {x, recompute(m) ? at::Tensor() : y, answered};
    };
    auto run_backward = [&](int64_t m) {
      auto [x, y, answered] = saved.at(m);
      saved.erase(m);
      if (!y.defined()) {
        y = forward(x, m);
      }
      if (last) {
        torch::autograd::backward({y});
      } else if (answered) {
        auto grad = take(true, m).first;
        if (y.requires_grad()) {
          torch::autograd::backward({y}, {grad});
        }
      }
      if (stage > 0 && x.requires_grad()) {
        auto grad = x.grad().defined() ? x.grad() : torch::zeros_like(x);
        mailbox.put({true, stage - 1, m}, hand_over(grad, devices[stage - 1], false));
      }
    };
    for (const auto& action : schedule[stage]) {
      const auto m = action.microbatch;
      const auto s = static_cast<int64_t>(stage);
      switch (action.kind) {
        case pipeline::ActionKind::Forward:
          recorder.record(s, "F", m, [&] { run_forward(m); });
          break;
        case pipeline::ActionKind::Backward:
          recorder.record(s, "B", m, [&] { run_backward(m); });
          break;
        case pipeline::ActionKind::Weight:
          recorder.record(s, "W", m, [&] { pipeline::run_weight_gradients(slot_of(stage, m)); });
          break;
      }
    }
  });
  recorder.sort();
  held.run();
  at::Tensor total = torch::zeros({}, losses[0].options());
  for (int64_t m = 0; m < chunks; ++m) {
    total += losses[m] * (static_cast<double>(inputs[m].size(0)) / static_cast<double>(input.size(0)));
  }
  return total;
}

} // namespace torch_mp
