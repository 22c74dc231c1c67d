#include <torch_mp/tensor_parallel.h>

#include <fnmatch.h>

#include <set>

#include <c10/util/Exception.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch_mp/nn.h>

namespace torch_mp {
namespace {

struct Rebuild {
  const TensorParallelPlan& plan;
  const Group& group;
  std::optional<at::Generator> generator;
  std::set<std::string> matched_patterns;
  // Whether the activations flowing past the current layer are sharded on their last dim (after a
  // colwise layer, until a rowwise one).
  bool sharded = false;

  // The style of the first pattern matching `name`; every matching pattern counts as used.
  const std::string* style_of(const std::string& name) {
    const std::string* style = nullptr;
    for (const auto& [pattern, pattern_style] : plan) {
      if (fnmatch(pattern.c_str(), name.c_str(), 0) == 0) {
        matched_patterns.insert(pattern);
        style = style ? style : &pattern_style;
      }
    }
    return style;
  }

  torch::nn::AnyModule layer(const std::string& name, const torch::nn::AnyModule& dense) {
    const auto* style = style_of(name);
    if (auto dropout = std::dynamic_pointer_cast<torch::nn::DropoutImpl>(dense.ptr());
        dropout && (style == nullptr || *style == "replicate")) {
      return torch::nn::AnyModule(nn::ParallelDropout(
          nn::ParallelDropoutOptions(dropout->options.p()).sharded(sharded).group(group).generator(generator)));
    }
    if (style == nullptr || *style == "replicate") {
      if (std::dynamic_pointer_cast<torch::nn::LinearImpl>(dense.ptr()) ||
          std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(dense.ptr())) {
        sharded = false;
      }
      return dense;
    }
    if (auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(dense.ptr())) {
      if (*style == "colwise") {
        sharded = true;
        return torch::nn::AnyModule(nn::column_parallel_from_dense(torch::nn::Linear(linear), group));
      }
      if (*style == "rowwise") {
        sharded = false;
        return torch::nn::AnyModule(nn::row_parallel_from_dense(torch::nn::Linear(linear), group));
      }
    }
    if (auto embedding = std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(dense.ptr())) {
      if (*style == "vocab") {
        sharded = false;
        return torch::nn::AnyModule(nn::vocab_parallel_from_dense(torch::nn::Embedding(embedding), group));
      }
    }
    TORCH_CHECK_VALUE(
        *style == "colwise" || *style == "rowwise" || *style == "vocab", "tensor_parallel: style '", *style,
        "' for '", name, "'; expected colwise, rowwise, vocab or replicate");
    TORCH_CHECK_VALUE(
        false, "tensor_parallel: style '", *style, "' for '", name, "', a ", dense.ptr()->name(), "; expected ",
        *style == "vocab" ? "a torch::nn::Embedding" : "a torch::nn::Linear");
  }

  torch::nn::Sequential sequence(torch::nn::SequentialImpl& dense) {
    torch::nn::Sequential result;
    const auto children = dense.named_children();
    size_t index = 0;
    for (auto it = dense.begin(); it != dense.end(); ++it, ++index) {
      const auto& name = children[index].key();
      result->push_back(name, layer(name, *it));
    }
    return result;
  }
};

} // namespace

torch::nn::Sequential tensor_parallel(
    const torch::nn::Sequential& module,
    const TensorParallelPlan& plan,
    const Group& group,
    std::optional<at::Generator> generator) {
  TORCH_CHECK_VALUE(!module.is_empty(), "tensor_parallel: the Sequential is null; expected a module to shard");
  Rebuild rebuild{plan, group, std::move(generator), {}};
  auto result = rebuild.sequence(*module.ptr());
  for (const auto& entry : plan) {
    TORCH_CHECK_VALUE(
        rebuild.matched_patterns.count(entry.first) > 0, "tensor_parallel: plan pattern '", entry.first,
        "' matches no module of the Sequential; expected a glob over its module names (\"0\", \"[13]\")");
  }
  return result;
}

} // namespace torch_mp
