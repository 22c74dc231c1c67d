#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>
#include <torch_mp/pipeline.h>

namespace torch_mp {

struct SplitOptions {
  // Layers per device, in order; empty: balanced by parameter and buffer bytes.
  TORCH_ARG(std::vector<int64_t>, balance);
  // The most bytes of parameters and buffers each device may hold; empty: no limit.
  TORCH_ARG(std::vector<int64_t>, max_memory);
  // Where the output lands; unset: the first device.
  TORCH_ARG(std::optional<c10::Device>, output_device) = std::nullopt;
  // Micro-batches per batch (along dim 0). Above 1, each stage runs on a thread of its own (on its
  // own stream on a GPU) and micro-batches flow through the stages.
  TORCH_ARG(int64_t, chunks) = 1;
  // The order of train_step's forwards and backwards: "gpipe", "1f1b" or "zb_h1" (zero bubble:
  // each backward split into B and W; the weight gradients of the torch::nn::Linear layers wait
  // for W through pipeline::deferred_linear, the other layers' come with B).
  TORCH_ARG(std::string, schedule) = "gpipe";
  // "never", "except_last" or "always": which micro-batches train_step recomputes in their backward
  // instead of keeping their activations.
  TORCH_ARG(std::string, checkpoint) = "never";
};

// The mean loss of a micro-batch from its output and target.
using LossFunction = std::function<at::Tensor(const at::Tensor& output, const at::Tensor& target)>;

// The layer count of each device that balance by size: layer_bytes (bytes of parameters and buffers
// per layer, in order) cut into capacities.size() contiguous runs (some possibly empty), run i
// holding at most capacities[i] bytes, with the largest run as small as possible and, among those
// cuts, the fewest empty runs (none when there are as many layers as devices and they fit), then the
// fewest layers in the longest run (equal bytes, unequal compute: [1, 3, 3, 1] rather than
// [1, 1, 5, 1] for a model whose embedding and head each weigh several layers). c10::ValueError
// when there are no layers or no devices, a size is negative, or no cut fits the capacities.
std::vector<int64_t> balance_by_size(
    const std::vector<int64_t>& layer_bytes,
    const std::vector<int64_t>& capacities);

// A torch::nn::Sequential whose layers live on several devices (GPipe, Huang et al., 2019, for the
// micro-batched side; torchgpipe's Pipe). Parameter names are the Sequential's own ("0.weight",
// ...), so its state_dict loads into the unsplit model and back. Input [batch, *] goes to the first
// stage's device; each stage's output moves to the next stage with torch_mp::to_device (its gradient
// flows back the same way); the output lands on output_device(). Micro-batches split the batch
// along dim 0 (torch::chunk: `chunks` parts, the last ones smaller or absent when the batch does not
// divide). Errors (c10::ValueError unless noted): a null or empty Sequential, no devices, a balance
// that does not add up to the layers or whose length is not the device count, max_memory that
// cannot hold the layers, chunks < 1, an unknown schedule or checkpoint name; in forward and
// train_step, a 0-dim input or a batch smaller than chunks, and whatever a layer raises (rethrown
// on the calling thread).
class SplitSequentialImpl : public torch::nn::Module {
 public:
  SplitSequentialImpl(
      torch::nn::Sequential sequential,
      std::vector<c10::Device> devices,
      SplitOptions options = {});

  // With chunks > 1 the micro-batches go through the stages at once and the outputs are
  // concatenated; backward through the result works as one GPipe pass.
  at::Tensor forward(at::Tensor input);

  // One training step: forward and backward of every micro-batch in the schedule's order, the
  // gradients accumulated in .grad() as the backward of loss_fn over the whole batch would (each
  // micro-batch's mean loss weighted by its size). input [batch, *] and target [batch, *] split
  // alike along dim 0. Returns the batch's loss, a detached scalar on output_device(). `timeline`
  // (optional): cleared, then filled with every stage's F, B, W and receive waits as they ran,
  // sorted by stage then start (Python's train_step(timeline=True)). c10::ValueError for an empty
  // loss_fn, or one that does not return a scalar.
  at::Tensor train_step(
      const at::Tensor& input,
      const at::Tensor& target,
      const LossFunction& loss_fn,
      std::vector<pipeline::TimelineEvent>* timeline = nullptr);

  // The device of each layer, in order.
  const std::vector<c10::Device>& device_map() const {
    return layer_devices_;
  }
  c10::Device output_device() const {
    return output_device_;
  }

 private:
  std::vector<torch::nn::AnyModule> layers_;
  std::vector<c10::Device> layer_devices_;
  std::vector<size_t> stage_of_layer_;
  c10::Device output_device_;
  SplitOptions options_;
  // Layer index ranges [first, last) of each non-empty stage, in order.
  std::vector<std::pair<size_t, size_t>> stages_;

  // `slot` >= 0: the stage's torch::nn::Linear layers compute through pipeline::deferred_linear,
  // their weight gradients queued under it (zero bubble).
  at::Tensor run_stage(size_t stage, at::Tensor input, int64_t slot = -1);
  std::vector<c10::Device> stage_devices() const;
  std::vector<at::Tensor> micro_batches(const at::Tensor& tensor, const char* what) const;
  at::Tensor pipelined_forward(const at::Tensor& input);
};
TORCH_MODULE(SplitSequential);

// Moves the layers of `sequential` onto `devices` and returns the split model: contiguous runs of
// layers, the run i on devices[i] (options.balance, or balanced by bytes). Devices may repeat
// (several "cpu" entries split a model within one device, as the tests do). The C++ face of
// torch_mp.split; the errors of SplitSequential.
SplitSequential split(
    torch::nn::Sequential sequential,
    std::vector<c10::Device> devices,
    SplitOptions options = {});

} // namespace torch_mp
