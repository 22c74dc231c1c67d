// Layer-wise split of a torch::nn::Sequential across devices: the C++ face of torch_mp.split.
#include <torch_mp/split.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <sstream>
#include <utility>

#include <c10/util/Exception.h>
#include <torch_mp/ops.h>

#include "detail/device.h"
#include "detail/join.h"

namespace torch_mp {
namespace {

using detail::join;

constexpr int64_t kUnlimited = std::numeric_limits<int64_t>::max();

int64_t module_bytes(const torch::nn::Module& module) {
  int64_t bytes = 0;
  for (const auto& tensor : module.parameters()) {
    bytes += tensor.numel() * static_cast<int64_t>(tensor.element_size());
  }
  for (const auto& tensor : module.buffers()) {
    bytes += tensor.numel() * static_cast<int64_t>(tensor.element_size());
  }
  return bytes;
}

void check_balance(
    const std::vector<int64_t>& balance,
    size_t num_devices,
    size_t num_layers) {
  TORCH_CHECK_VALUE(
      balance.size() == num_devices,
      "split: balance ", join(balance), " has ", balance.size(), " entries but there are ",
      num_devices, " devices; expected one layer count per device");
  for (const auto count : balance) {
    TORCH_CHECK_VALUE(
        count >= 0, "split: balance ", join(balance), " has a negative layer count; expected counts >= 0");
  }
  const auto total = std::accumulate(balance.begin(), balance.end(), int64_t{0});
  TORCH_CHECK_VALUE(
      total == static_cast<int64_t>(num_layers),
      "split: balance ", join(balance), " adds up to ", total, " layers but the model has ",
      num_layers, " layers; expected the counts to add up to ", num_layers);
}

} // namespace

std::vector<int64_t> balance_by_size(
    const std::vector<int64_t>& layer_bytes,
    const std::vector<int64_t>& capacities) {
  const auto n = layer_bytes.size();
  const auto k = capacities.size();
  TORCH_CHECK_VALUE(n > 0, "split: the model has no layers: nothing to split");
  TORCH_CHECK_VALUE(k > 0, "split: no devices given; expected at least one device");

  std::vector<int64_t> prefix(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(layer_bytes[i] >= 0, "split: layer ", i, " has a negative size ", layer_bytes[i]);
    prefix[i + 1] = prefix[i] + layer_bytes[i];
  }

  // best[j][i]: the least possible largest device load when layers [0, i) sit on devices [0, j),
  // each device holding a contiguous run (possibly empty) that fits its capacity.
  std::vector<std::vector<int64_t>> best(k + 1, std::vector<int64_t>(n + 1, kUnlimited));
  best[0][0] = 0;
  for (size_t j = 1; j <= k; ++j) {
    for (size_t i = 0; i <= n; ++i) {
      for (size_t t = 0; t <= i; ++t) {
        const auto load = prefix[i] - prefix[t];
        if (best[j - 1][t] != kUnlimited && load <= capacities[j - 1]) {
          best[j][i] = std::min(best[j][i], std::max(best[j - 1][t], load));
        }
      }
    }
  }
  std::vector<std::string> shown_capacities;
  for (const auto capacity : capacities) {
    shown_capacities.push_back(capacity == kUnlimited ? "unlimited" : std::to_string(capacity));
  }
  TORCH_CHECK_VALUE(
      best[k][n] != kUnlimited,
      "split: max_memory ", join(shown_capacities), " (bytes per device) cannot hold the model: its ", n,
      " layers need ", prefix[n], " bytes in all and the largest needs ",
      *std::max_element(layer_bytes.begin(), layer_bytes.end()),
      " bytes; expected max_memory large enough for contiguous runs of layers");

  // Among the cuts whose largest load is that least one, the fewest empty runs (parameter-free
  // layers weigh nothing: [0, 2] would be as good as [1, 1] by load alone), then the fewest layers
  // on the busiest device: layers of equal bytes cost about equal time, so ends that hold an
  // embedding or a head as large as several layers get one layer each and the middle devices share
  // the rest evenly ([1, 3, 3, 1], not [1, 1, 5, 1]). rank[j][i] = (empty runs, largest run in
  // layers) of the best such cut of layers [0, i) over devices [0, j): a sum, then a maximum, so
  // the best cut's prefix is a best cut of its own.
  const auto bound = best[k][n];
  using Rank = std::pair<size_t, size_t>;
  const Rank none{std::numeric_limits<size_t>::max(), std::numeric_limits<size_t>::max()};
  std::vector<std::vector<Rank>> rank(k + 1, std::vector<Rank>(n + 1, none));
  std::vector<std::vector<size_t>> cut(k + 1, std::vector<size_t>(n + 1, 0));
  rank[0][0] = {0, 0};
  for (size_t j = 1; j <= k; ++j) {
    for (size_t i = 0; i <= n; ++i) {
      for (size_t t = 0; t <= i; ++t) {
        const auto load = prefix[i] - prefix[t];
        if (rank[j - 1][t] == none || load > capacities[j - 1] || load > bound) {
          continue;
        }
        const Rank candidate{rank[j - 1][t].first + (t == i ? 1 : 0), std::max(rank[j - 1][t].second, i - t)};
        if (candidate < rank[j][i]) {
          rank[j][i] = candidate;
          cut[j][i] = t;
        }
      }
    }
  }

  std::vector<int64_t> counts(k, 0);
  for (size_t j = k, i = n; j > 0; --j) {
    const auto t = cut[j][i];
    counts[j - 1] = static_cast<int64_t>(i - t);
    i = t;
  }
  return counts;
}

SplitSequentialImpl::SplitSequentialImpl(
    torch::nn::Sequential sequential,
    std::vector<c10::Device> devices,
    SplitOptions options)
    : output_device_(c10::kCPU), options_(options) {
  TORCH_CHECK_VALUE(!sequential.is_empty(), "split: the Sequential is null; expected a module to split");
  TORCH_CHECK_VALUE(!devices.empty(), "split: no devices given; expected at least one device");
  const auto num_layers = sequential->size();
  TORCH_CHECK_VALUE(num_layers > 0, "split: the Sequential has no layers: nothing to split");
  for (auto& device : devices) {
    detail::check_device_available(device, "split(devices=...)");
    device = detail::normalize_device(device);
  }
  TORCH_CHECK_VALUE(
      options.chunks() >= 1, "split: chunks = ", options.chunks(), "; expected >= 1 micro-batches");
  TORCH_CHECK_VALUE(
      options.schedule() == "gpipe" || options.schedule() == "1f1b" || options.schedule() == "zb_h1",
      "split: schedule = '", options.schedule(),
      "'; expected 'gpipe', '1f1b' or 'zb_h1' (schedules of several stages per device, 'interleaved_1f1b' and "
      "'zbv', are torch_mp.split's in Python)");
  TORCH_CHECK_VALUE(
      options.checkpoint() == "never" || options.checkpoint() == "except_last" || options.checkpoint() == "always",
      "split: checkpoint = '", options.checkpoint(), "'; expected 'never', 'except_last' or 'always'");
  if (options.output_device()) {
    detail::check_device_available(*options.output_device(), "split(output_device=...)");
  }
  output_device_ = detail::normalize_device(options.output_device().value_or(devices.front()));

  std::vector<int64_t> capacities = options.max_memory();
  if (capacities.empty()) {
    capacities.assign(devices.size(), kUnlimited);
  }
  TORCH_CHECK_VALUE(
      capacities.size() == devices.size(),
      "split: max_memory has ", capacities.size(), " entries but there are ", devices.size(),
      " devices; expected one byte limit per device");

  const auto children = sequential->named_children();
  std::vector<int64_t> layer_bytes;
  for (const auto& child : children) {
    layer_bytes.push_back(module_bytes(*child.value()));
  }
  std::vector<int64_t> counts = options.balance();
  if (counts.empty()) {
    counts = balance_by_size(layer_bytes, capacities);
  } else {
    check_balance(counts, devices.size(), num_layers);
  }

  size_t layer = 0;
  for (size_t d = 0; d < devices.size(); ++d) {
    int64_t load = 0;
    for (int64_t c = 0; c < counts[d]; ++c, ++layer) {
      load += layer_bytes[layer];
      const auto& child = children[layer];
      child.value()->to(devices[d]);
      register_module(child.key(), child.value());
      layers_.push_back(*(sequential->begin() + static_cast<std::ptrdiff_t>(layer)));
      layer_devices_.push_back(devices[d]);
      stage_of_layer_.push_back(d);
    }
    TORCH_CHECK_VALUE(
        load <= capacities[d],
        "split: device ", d, " ('", devices[d], "') gets ", counts[d], " layers of ", load,
        " bytes but its max_memory is ", capacities[d], " bytes");
    if (counts[d] > 0) {
      stages_.emplace_back(layer - static_cast<size_t>(counts[d]), layer);
    }
  }
}

// Activations are copied at every stage boundary, also between stages on the same device, so a
// split across {cpu, cpu} runs the same transfers (and their backward) as one across two devices.
at::Tensor SplitSequentialImpl::forward(at::Tensor input) {
  if (options_.chunks() > 1) {
    return pipelined_forward(input);
  }
  for (size_t i = 0; i < layers_.size(); ++i) {
    const bool boundary = i > 0 && stage_of_layer_[i] != stage_of_layer_[i - 1];
    if (boundary || input.device() != layer_devices_[i]) {
      input = torch_mp::to_device(input, layer_devices_[i]);
    }
    input = layers_[i].forward(input);
  }
  if (input.device() != output_device_) {
    input = torch_mp::to_device(input, output_device_);
  }
  return input;
}

SplitSequential split(
    torch::nn::Sequential sequential,
    std::vector<c10::Device> devices,
    SplitOptions options) {
  return SplitSequential(std::move(sequential), std::move(devices), std::move(options));
}

} // namespace torch_mp
