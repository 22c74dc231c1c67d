#pragma once

// torch_mp::save / torch_mp::load for tensors held by one rank of several (a C++ pipeline's
// stages): each rank writes its own safetensors file, rank 0 the index, as torch_mp.save does.
#include <exception>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace torch::nn {
class Module;
} // namespace torch::nn

namespace torch_mp::detail {

// The parameters and buffers of `module`, by name (the stock names), in that order.
std::vector<std::pair<std::string, at::Tensor>> named_tensors(const torch::nn::Module& module);

// Called by every rank after each step of a save with this rank's error (null: none); throws on
// every rank when any rank failed: this rank's own error where it failed. Names the step.
using AgreeOnStep = std::function<void(const std::string& step, std::exception_ptr error)>;

// Saves `tensors` (this rank's, by stock name, each held by one rank only) and this rank's CPU
// random state ("rng/cpu/<rank>") as rank `rank` of `world` into the checkpoint folder `path`:
// its file rank-<rank>-of-<world>.safetensors; rank 0 merges the ranks' manifests into the index,
// whose "model" is `model` (every stock name of the module, in order), then renames
// `path`.incomplete into place. Errors: those of torch_mp::save.
void save_checkpoint(
    const std::vector<std::pair<std::string, at::Tensor>>& tensors,
    const std::vector<std::string>& model,
    const std::string& path,
    int64_t rank,
    int64_t world,
    const AgreeOnStep& agree);

// Loads the checkpoint at `path` into `targets` (by stock name). `partial`: the checkpoint may hold
// other tensors (other ranks' stages), which are skipped; otherwise it must hold exactly the
// targets. Restores the CPU random state "rng/cpu/<rank>" when the checkpoint was written by
// `world` ranks. Errors: those of torch_mp::load.
void load_checkpoint(
    const std::vector<std::pair<std::string, at::Tensor>>& targets,
    const std::string& path,
    bool partial,
    int64_t rank,
    int64_t world);

} // namespace torch_mp::detail
