#pragma once

// What a pipeline stage does the same whether its peers are threads (split/pipelined.cpp) or
// ranks (pipeline/pipeline_parallel.cpp): run its layers (zero bubble: the linears through
// deferred_linear), record its timeline, hold its parameters' post-accumulate hooks over a step.
#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/linear.h>
#include <torch/ordered_dict.h>
#include <torch_mp/pipeline.h>

namespace torch_mp::detail {

// layers[first, last) on `input`. `slot` >= 0 with grad mode on: the torch::nn::Linear layers
// compute through pipeline::deferred_linear, their weight gradients queued under `slot` (zero bubble).
inline at::Tensor run_layers(std::vector<torch::nn::AnyModule>& layers, size_t first, size_t last,
                             at::Tensor input, int64_t slot = -1) {
  for (auto i = first; i < last; ++i) {
    const auto linear = slot >= 0 ? std::dynamic_pointer_cast<torch::nn::LinearImpl>(layers[i].ptr()) : nullptr;
    if (linear && torch::GradMode::is_enabled()) {
      const auto bias = linear->bias.defined() ? std::optional<at::Tensor>(linear->bias) : std::nullopt;
      input = pipeline::deferred_linear(input, linear->weight, bias, slot);
    } else {
      input = layers[i].forward(input);
    }
  }
  return input;
}

// Collects the timeline of a step, from one thread or several; does nothing without a timeline.
class Recorder {
 public:
  using Clock = std::chrono::steady_clock;

  explicit Recorder(std::vector<pipeline::TimelineEvent>* timeline) : timeline_(timeline), origin_(Clock::now()) {
    if (timeline_) {
      timeline_->clear();
    }
  }

  // Runs body() and records it as an interval of `kind`.
  template <typename Body>
  auto record(int64_t stage, const char* kind, int64_t micro_batch, Body body) {
    if (!timeline_) {
      return body();
    }
    const auto start = Clock::now();
    struct Finish {
      Recorder& recorder;
      pipeline::TimelineEvent event;
      Clock::time_point start;
      ~Finish() {
        event.start = recorder.seconds(start);
        event.end = recorder.seconds(Clock::now());
        std::lock_guard<std::mutex> lock(recorder.mutex_);
        recorder.timeline_->push_back(std::move(event));
      }
    } finish{*this, {stage, kind, micro_batch, 0.0, 0.0}, start};
    return body();
  }

  void sort() {
    if (timeline_) {
      std::sort(timeline_->begin(), timeline_->end(), [](const auto& a, const auto& b) {
        return std::tie(a.stage, a.start) < std::tie(b.stage, b.start);
      });
    }
  }

 private:
  double seconds(Clock::time_point at) const {
    return std::chrono::duration<double>(at - origin_).count();
  }

  std::vector<pipeline::TimelineEvent>* timeline_;
  Clock::time_point origin_;
  std::mutex mutex_;
};

// A parameter's gradient hooks under micro-batches: each micro-batch's backward accumulates its
// part of the gradient, so a hook on the gradient (Tensor::register_hook) would see the parts one by
// one (a non-linear one, such as clamping, then differs from the dense model's): refused before
// anything runs (`what`: the caller, for the message). Post-accumulate hooks are held back during
// the step and run once after it, in the dense model's place (after the whole batch's gradient is
// in .grad); a failed step puts them back without running them.
class HeldPostAccumulateHooks {
 public:
  HeldPostAccumulateHooks(const torch::OrderedDict<std::string, at::Tensor>& params, int64_t chunks,
                          const char* what) {
    if (chunks == 1) {
      return;
    }
    for (const auto& item : params) {
      TORCH_CHECK_VALUE(
          torch::autograd::impl::hooks(item.value()).empty(), what, ": parameter '", item.key(),
          "' has a gradient hook (Tensor::register_hook); with chunks = ", chunks,
          " it would see each micro-batch's part of the gradient instead of the batch's; expected chunks = 1");
    }
    for (const auto& item : params) {
      auto& hook = torch::autograd::impl::post_acc_grad_hooks(item.value());
      if (hook) {
        params_.push_back(item.value());
        held_.push_back(std::move(hook));
      }
    }
  }

  // Puts the hooks back without running them (a failed step).
  ~HeldPostAccumulateHooks() {
    restore();
  }

  // After the step: puts the hooks back and runs each once, with the batch's gradient.
  void run() {
    restore();
    for (const auto& param : params_) {
      if (param.grad().defined()) {
        (*torch::autograd::impl::post_acc_grad_hooks(param))(param);
      }
    }
  }

 private:
  void restore() {
    for (size_t i = 0; i < held_.size(); ++i) {
      torch::autograd::impl::post_acc_grad_hooks(params_[i]) = std::move(held_[i]);
    }
    held_.clear();
  }

  std::vector<at::Tensor> params_;
  std::vector<std::unique_ptr<torch::autograd::PostAccumulateGradHook>> held_;
};

} // namespace torch_mp::detail
