// The B/W split of a linear layer (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024):
// backward computes the input gradient and queues the weight gradient's work under the slot its
// forward was given; run_weight_gradients(slot) does that work when the schedule's W comes.
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <torch/autograd.h>
#include <torch/library.h>

#include <torch_mp/pipeline.h>

#include "ops/autograd/linear_grads.h"

namespace torch_mp::pipeline {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One linear call's weight-gradient work: the gradients of `weight` and `bias` (undefined where not
// wanted) from the call's input and its output's gradient. `transposed`: `weight` is the parameter
// stored [in, out] whose transpose the call multiplied by.
struct WeightGradient {
  at::Tensor input, grad_output, weight, bias;
  bool transposed = false;
};

class DeferredWork {
 public:
  static DeferredWork& instance() {
    static DeferredWork work;
    return work;
  }

  void queue(int64_t slot, WeightGradient work) {
    std::lock_guard<std::mutex> lock(mutex_);
    queued_[slot].push_back(std::move(work));
  }

  std::vector<WeightGradient> take(int64_t slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = queued_.find(slot);
    if (found == queued_.end()) {
      return {};
    }
    auto works = std::move(found->second);
    queued_.erase(found);
    return works;
  }

  int64_t pending(int64_t slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = queued_.find(slot);
    return found == queued_.end() ? 0 : static_cast<int64_t>(found->second.size());
  }

 private:
  std::mutex mutex_;
  std::unordered_map<int64_t, std::vector<WeightGradient>> queued_;
};

// As AccumulateGrad: the first gradient becomes .grad, later ones are added to it.
void accumulate(const at::Tensor& param, const at::Tensor& grad) {
  auto& current = param.mutable_grad();
  if (!current.defined()) {
    current = grad;
  } else {
    current.add_(grad);
  }
}

// The leaf parameter whose transpose `weight` is (transformers' Conv1D stores its weight [in, out]
// and multiplies by weight.t()), or an undefined tensor.
at::Tensor transposed_leaf(const at::Tensor& weight) {
  if (!weight.is_view() || weight.dim() != 2) {
    return at::Tensor();
  }
  const auto& base = weight._base();
  const bool transpose = base.is_leaf() && base.dim() == 2 && weight.storage_offset() == base.storage_offset() &&
      weight.sizes()[0] == base.sizes()[1] && weight.sizes()[1] == base.sizes()[0] &&
      weight.strides()[0] == base.strides()[1] && weight.strides()[1] == base.strides()[0];
  return transpose ? at::Tensor(base) : at::Tensor();
}

class DeferredLinearFunction : public torch::autograd::Function<DeferredLinearFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& input,
      const at::Tensor& weight,
      const std::optional<at::Tensor>& bias,
      int64_t slot) {
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->save_for_backward({input, weight});
    ctx->saved_data["has_bias"] = has_bias;
    // Only a leaf's gradient can wait (or a leaf's transpose's, written to the leaf in its layout): a
    // computed weight's gradient flows on through its graph in B.
    const auto stored_transposed = weight.is_leaf() ? at::Tensor() : transposed_leaf(weight);
    const bool defer =
        slot >= 0 && (weight.is_leaf() || stored_transposed.defined()) && (!has_bias || bias->is_leaf());
    ctx->saved_data["slot"] = defer ? slot : int64_t{-1};
    if (defer) {
      // The parameters themselves, for their .grad (an unpacked saved tensor may be another view).
      ctx->saved_data["weight"] = stored_transposed.defined() ? stored_transposed : weight;
      ctx->saved_data["transposed"] = stored_transposed.defined();
      ctx->saved_data["bias"] = has_bias ? *bias : at::Tensor();
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    return deferred_linear(input, weight, bias, slot);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto& grad = grad_outputs[0];
    if (!grad.defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const auto saved = ctx->get_saved_variables();
    const auto& input = saved[0];
    const auto& weight = saved[1];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const auto grad_input = ctx->needs_input_grad(0) ? grad.matmul(weight) : at::Tensor();
    const bool want_weight = ctx->needs_input_grad(1);
    const bool want_bias = has_bias && ctx->needs_input_grad(2);
    const auto slot = ctx->saved_data["slot"].toInt();
    // A backward that builds a graph (create_graph=True) gets every gradient now, differentiable.
    if (slot < 0 || at::GradMode::is_enabled()) {
      return {
          grad_input, want_weight ? detail::linear_weight_grad(grad, input) : at::Tensor(),
          want_bias ? detail::linear_bias_grad(grad) : at::Tensor(), at::Tensor()};
    }
    if (want_weight || want_bias) {
      DeferredWork::instance().queue(
          slot, {input, grad, want_weight ? ctx->saved_data["weight"].toTensor() : at::Tensor(),
                 want_bias ? ctx->saved_data["bias"].toTensor() : at::Tensor(),
                 ctx->saved_data["transposed"].toBool()});
    }
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor deferred_linear_autograd(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    int64_t slot) {
  return DeferredLinearFunction::apply(input, weight, bias, slot);
}

} // namespace

int64_t allocate_weight_gradient_slots(int64_t count) {
  TORCH_CHECK_VALUE(count >= 0, "allocate_weight_gradient_slots: count = ", count, "; expected >= 0");
  static std::atomic<int64_t> next{0};
  return next.fetch_add(count);
}

int64_t run_weight_gradients(int64_t slot) {
  const auto works = DeferredWork::instance().take(slot);
  at::NoGradGuard no_grad;
  for (const auto& work : works) {
    if (work.weight.defined()) {
      accumulate(
          work.weight,
          work.transposed ? detail::linear_weight_grad(work.input, work.grad_output)
                          : detail::linear_weight_grad(work.grad_output, work.input));
    }
    if (work.bias.defined()) {
      accumulate(work.bias, detail::linear_bias_grad(work.grad_output));
    }
  }
  return static_cast<int64_t>(works.size());
}

int64_t pending_weight_gradients(int64_t slot) {
  return DeferredWork::instance().pending(slot);
}

void discard_weight_gradients(int64_t slot) {
  DeferredWork::instance().take(slot);
}

TORCH_LIBRARY_IMPL(torch_mp, Autograd, m) {
  m.impl("deferred_linear", &deferred_linear_autograd);
}

} // namespace torch_mp::pipeline
