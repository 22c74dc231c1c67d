#pragma once

#include <optional>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>

namespace torch_mp {

struct SplitOptions {
  // Layers per device, in order; empty: balanced by parameter and buffer bytes.
  TORCH_ARG(std::vector<int64_t>, balance);
  // The most bytes of parameters and buffers each device may hold; empty: no limit.
  TORCH_ARG(std::vector<int64_t>, max_memory);
  // Where the output lands; unset: the first device.
  TORCH_ARG(std::optional<c10::Device>, output_device) = std::nullopt;
};

// Splits the layers of `sequential` into contiguous runs, the run i on devices[i]. Devices may repeat
// (several "cpu" entries split a model within one device, as the tests do).
std::vector<int64_t> balance_by_size(
    const std::vector<int64_t>& layer_bytes,
    const std::vector<int64_t>& capacities);

// A torch::nn::Sequential whose layers live on several devices. Parameter names are the
// Sequential's own ("0.weight", ...), so its state_dict loads into the unsplit model and back.
class SplitSequentialImpl : public torch::nn::Module {
 public:
  SplitSequentialImpl(
      torch::nn::Sequential sequential,
      std::vector<c10::Device> devices,
      SplitOptions options = {});

  at::Tensor forward(at::Tensor input);

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
};
TORCH_MODULE(SplitSequential);

// Moves the layers of `sequential` onto `devices` and returns the split model.
SplitSequential split(
    torch::nn::Sequential sequential,
    std::vector<c10::Device> devices,
    SplitOptions options = {});

} // namespace torch_mp
