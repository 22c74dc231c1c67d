#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Generator.h>
#include <torch/nn/modules/container/sequential.h>

#include <torch_mp/comm.h>

namespace torch_mp {

// Glob patterns over module names ("0", "[13]", "*") to styles: "colwise" (output features
// split), "rowwise" (input features split, one all-reduce), "vocab" (an embedding's rows split) or
// "replicate". The first pattern that matches a module decides its style.
using TensorParallelPlan = std::vector<std::pair<std::string, std::string>>;

// The C++ face of torch_mp.tensor_parallel, for torch::nn::Sequential (the C++ container whose
// forward torch_mp can rebuild: a LibTorch module's own forward calls its members directly): a
// Sequential with the same layers, where each torch::nn::Linear or Embedding that the plan names is
// replaced by its parallel counterpart holding this rank's slice. Module and parameter names are
// unchanged, so state dicts map one to one: a parameter of the result is this rank's shard (nn.h
// says which rows or columns) of the same-named dense parameter; replicated layers are shared.
// With every rank of `group` running it, the result computes what `module` does (forward and
// backward; Megatron-LM's MLP pattern is a colwise layer followed by a rowwise one). Each
// torch::nn::Dropout becomes an nn::ParallelDropout drawing the dense model's masks from
// `generator` (unset: the default CPU generator; every rank in the same state), sharded when it
// runs on a colwise layer's output before the next rowwise layer: with the same seed, the result
// computes what `module` does in training mode too. Errors (c10::ValueError): a null Sequential, an
// unknown style, a pattern that matches no module, a style on a module that cannot take it
// (colwise/rowwise on a non-Linear, vocab on a non-Embedding), and the layers' own errors (sizes not
// a multiple of the group size).
torch::nn::Sequential tensor_parallel(
    const torch::nn::Sequential& module,
    const TensorParallelPlan& plan,
    const Group& group,
    std::optional<at::Generator> generator = std::nullopt);

} // namespace torch_mp
