#include <torch_mp/nn.h>

#include <cmath>

#include <torch/nn/init.h>
#include <torch_mp/ops.h>

#include "nn/parallel_group.h"

namespace torch_mp::nn {
namespace {

void check_size(const char* layer, const char* what, int64_t value) {
  TORCH_CHECK_VALUE(value >= 0, layer, ": ", what, " is ", value, "; expected a size >= 0");
}

// This rank's share of `total` (`what`: the option split across the group), checking the group too.
int64_t shard_size(const char* layer, const char* what, int64_t total, const Group& group) {
  TORCH_CHECK_VALUE(
      group.size >= 1 && group.rank >= 0 && group.rank < group.size, layer, ": group '", group.name, "' has size ",
      group.size, " and rank ", group.rank, "; expected size >= 1 and 0 <= rank < size");
  check_size(layer, what, total);
  const auto group_size = group.size;
  TORCH_CHECK_VALUE(
      total % group_size == 0, layer, ": ", what, " ", total, " is not divisible by the group size ", group_size,
      "; expected a multiple of ", group_size);
  return total / group_size;
}

// torch::nn::Linear's initialization, with the fan-in of the whole (unsharded) layer.
void init_linear(at::Tensor& weight, at::Tensor& bias, int64_t fan_in) {
  const double bound = fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
  torch::nn::init::uniform_(weight, -bound, bound);
  if (bias.defined()) {
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

// Copies `source` into the parameter `target`, outside autograd.
void assign(at::Tensor& target, const at::Tensor& source) {
  torch::NoGradGuard no_grad;
  target.copy_(source);
}

} // namespace

ColumnParallelLinearImpl::ColumnParallelLinearImpl(ColumnParallelLinearOptions options_)
    : options(std::move(options_)) {
  reset();
}

void ColumnParallelLinearImpl::reset() {
  const auto local = shard_size(
      "ColumnParallelLinear", "out_features", options.out_features(), options.group());
  check_size("ColumnParallelLinear", "in_features", options.in_features());
  weight = register_parameter("weight", torch::empty({local, options.in_features()}));
  bias = register_parameter("bias", options.bias() ? torch::empty({local}) : at::Tensor(), options.bias());
  init_linear(weight, bias, options.in_features());
}

at::Tensor ColumnParallelLinearImpl::forward(const at::Tensor& input) {
  return column_parallel_linear(
      input, weight, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, options.gather_output(),
      options.group());
}

RowParallelLinearImpl::RowParallelLinearImpl(RowParallelLinearOptions options_) : options(std::move(options_)) {
  reset();
}

void RowParallelLinearImpl::reset() {
  const auto local =
      shard_size("RowParallelLinear", "in_features", options.in_features(), options.group());
  check_size("RowParallelLinear", "out_features", options.out_features());
  weight = register_parameter("weight", torch::empty({options.out_features(), local}));
  bias = register_parameter(
      "bias", options.bias() ? torch::empty({options.out_features()}) : at::Tensor(), options.bias());
  init_linear(weight, bias, options.in_features());
}

at::Tensor RowParallelLinearImpl::forward(const at::Tensor& input) {
  return row_parallel_linear(
      input, weight, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt,
      options.input_is_parallel(), options.group());
}

VocabParallelEmbeddingImpl::VocabParallelEmbeddingImpl(VocabParallelEmbeddingOptions options_)
    : options(std::move(options_)) {
  reset();
}

void VocabParallelEmbeddingImpl::reset() {
  const auto local = shard_size(
      "VocabParallelEmbedding", "num_embeddings", options.num_embeddings(), options.group());
  check_size("VocabParallelEmbedding", "embedding_dim", options.embedding_dim());
  weight = register_parameter("weight", torch::empty({local, options.embedding_dim()}));
  torch::nn::init::normal_(weight);
}

int64_t VocabParallelEmbeddingImpl::vocab_start() const {
  return options.group().rank * weight.size(0);
}

at::Tensor VocabParallelEmbeddingImpl::forward(const at::Tensor& input) {
  return vocab_parallel_embedding(input, weight, vocab_start(), options.group());
}

ColumnParallelLinear column_parallel_from_dense(const torch::nn::Linear& dense, const Group& group, bool gather_output) {
  const auto& dense_options = dense->options;
  ColumnParallelLinear layer(ColumnParallelLinearOptions(dense_options.in_features(), dense_options.out_features())
                                 .bias(dense_options.bias())
                                 .gather_output(gather_output)
                                 .group(group));
  const auto rows = layer->weight.size(0);
  assign(layer->weight, dense->weight.narrow(0, group.rank * rows, rows));
  if (dense_options.bias()) {
    assign(layer->bias, dense->bias.narrow(0, group.rank * rows, rows));
  }
  return layer;
}

RowParallelLinear row_parallel_from_dense(const torch::nn::Linear& dense, const Group& group, bool input_is_parallel) {
  const auto& dense_options = dense->options;
  RowParallelLinear layer(RowParallelLinearOptions(dense_options.in_features(), dense_options.out_features())
                              .bias(dense_options.bias())
                              .input_is_parallel(input_is_parallel)
                              .group(group));
  const auto columns = layer->weight.size(1);
  assign(layer->weight, dense->weight.narrow(1, group.rank * columns, columns));
  if (dense_options.bias()) {
    assign(layer->bias, dense->bias);
  }
  return layer;
}

VocabParallelEmbedding vocab_parallel_from_dense(const torch::nn::Embedding& dense, const Group& group) {
  VocabParallelEmbedding layer(
      VocabParallelEmbeddingOptions(dense->options.num_embeddings(), dense->options.embedding_dim()).group(group));
  const auto rows = layer->weight.size(0);
  assign(layer->weight, dense->weight.narrow(0, layer->vocab_start(), rows));
  return layer;
}

ParallelDropoutImpl::ParallelDropoutImpl(ParallelDropoutOptions options_) : options(std::move(options_)) {
  reset();
}

void ParallelDropoutImpl::reset() {
  TORCH_CHECK_VALUE(options.p() >= 0 && options.p() <= 1, "ParallelDropout: p = ", options.p(),
                    "; expected a probability in [0, 1]");
  const auto& group = options.group();
  TORCH_CHECK_VALUE(group.size >= 1 && group.rank >= 0 && group.rank < group.size, "ParallelDropout: group '",
                    group.name, "' has size ", group.size, " and rank ", group.rank,
                    "; expected size >= 1 and 0 <= rank < size");
}

at::Tensor ParallelDropoutImpl::forward(const at::Tensor& input) {
  const auto p = options.p();
  if (!is_training() || p == 0 || input.numel() == 0) {
    return input;
  }
  if (p == 1) {
    return input * at::zeros({}, input.options());
  }
  const auto& group = options.group();
  const bool sharded = options.sharded() && group.size > 1;
  TORCH_CHECK_VALUE(!sharded || (input.dim() >= 1 && input.device().is_cpu()), "ParallelDropout: a sharded ",
                    input.device(), " input of shape ", input.sizes(),
                    "; expected a CPU tensor with a feature (last) dim");
  // The dense model's mask (torch's CPU dropout: empty_like(input).bernoulli_(1 - p)), then this rank's block.
  auto dense_shape = input.sizes().vec();
  if (sharded) {
    dense_shape.back() *= group.size;
  }
  auto noise = at::empty(dense_shape, input.options().memory_format(at::MemoryFormat::Contiguous));
  noise.bernoulli_(1 - p, options.generator());
  if (sharded) {
    noise = noise.narrow(-1, group.rank * input.size(-1), input.size(-1));
  }
  return input * noise.div_(1 - p);
}

VocabParallelCrossEntropyLossImpl::VocabParallelCrossEntropyLossImpl(VocabParallelCrossEntropyLossOptions options_)
    : options(std::move(options_)) {
  reset();
}

void VocabParallelCrossEntropyLossImpl::reset() {
  const auto& reduction = options.reduction();
  TORCH_CHECK_VALUE(
      reduction == "mean" || reduction == "sum" || reduction == "none",
      "VocabParallelCrossEntropyLoss: reduction '", reduction, "'; expected 'mean', 'sum' or 'none'");
}

at::Tensor VocabParallelCrossEntropyLossImpl::forward(const at::Tensor& logits, const at::Tensor& target) {
  const auto& group = options.group();
  // A 0-dim logits has no vocabulary dim: the operator's shape check says so.
  const auto local_vocab = logits.dim() > 0 ? logits.size(-1) : 0;
  auto losses = torch_mp::vocab_parallel_cross_entropy(
      logits, target, group.rank * local_vocab, options.ignore_index(), group);
  if (options.reduction() == "none") {
    return losses;
  }
  if (options.reduction() == "sum") {
    return losses.sum();
  }
  return losses.sum() / (target != options.ignore_index()).sum();
}

} // namespace torch_mp::nn

namespace torch_mp::detail {

std::optional<Group> tensor_parallel_group(const torch::nn::Module& module, std::string_view op,
                                           std::unordered_set<const c10::TensorImpl*>* sharded) {
  std::optional<Group> found;
  auto take = [&](const Group& group, std::initializer_list<const at::Tensor*> shards) {
    for (const auto* shard : shards) {
      if (sharded && shard->defined()) {
        sharded->insert(shard->unsafeGetTensorImpl());
      }
    }
    if (group.size <= 1) {
      return;
    }
    TORCH_CHECK_VALUE(!found || found->name == group.name, op, ": the module holds parallel layers of the groups '",
                      found ? found->name : "", "' and '", group.name, "'; expected one tensor-parallel group");
    found = group;
  };
  for (const auto& child : module.modules(/*include_self=*/true)) {
    if (const auto* layer = dynamic_cast<const nn::ColumnParallelLinearImpl*>(child.get())) {
      take(layer->options.group(), {&layer->weight, &layer->bias});
    } else if (const auto* layer = dynamic_cast<const nn::RowParallelLinearImpl*>(child.get())) {
      take(layer->options.group(), {&layer->weight});
    } else if (const auto* layer = dynamic_cast<const nn::VocabParallelEmbeddingImpl*>(child.get())) {
      take(layer->options.group(), {&layer->weight});
    }
  }
  return found;
}

} // namespace torch_mp::detail
