#pragma once

// Tensor-parallel layers for LibTorch programs (Megatron-LM's ColumnParallelLinear,
// RowParallelLinear, VocabParallelEmbedding): torch::nn module holders over the torch_mp operators
// of ops.h. Each can be built from a dense torch::nn layer (`*_from_dense`), taking this rank's
// shard. `world` is the group's size and `r` this process's rank in it (Group::rank).
//
// Errors: constructing a layer (or reset()) raises c10::ValueError when a size is negative, the
// sharded size is not a multiple of world, or the group's size or rank is out of range; forward
// raises what the operator it calls raises (ops.h: c10::ValueError, c10::TypeError,
// torch_mp::CollectiveError).
#include <optional>
#include <string>

#include <ATen/core/Generator.h>

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <torch_mp/comm.h>

namespace torch_mp::nn {

struct ColumnParallelLinearOptions {
  ColumnParallelLinearOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);  // of the whole layer; each rank holds out_features / group size
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(bool, gather_output) = false;
  TORCH_ARG(Group, group) = Group::single();
};

// Linear layer with the output features sharded across the group (colwise): input [*, in_features],
// replicated -> [*, out_features / world] (gather_output: [*, out_features], all-gathered). Rank r
// holds the rows [r * out_features / world, (r + 1) * out_features / world) of the dense weight and
// bias. forward/backward: torch_mp::column_parallel_linear (backward all-reduces the input gradient).
// Initialized as torch::nn::Linear is, with the fan-in of the whole layer.
class ColumnParallelLinearImpl : public torch::nn::Cloneable<ColumnParallelLinearImpl> {
 public:
  explicit ColumnParallelLinearImpl(ColumnParallelLinearOptions options);
  void reset() override;
  at::Tensor forward(const at::Tensor& input);

  ColumnParallelLinearOptions options;
  at::Tensor weight;  // [out_features / group size, in_features]
  at::Tensor bias;    // [out_features / group size], undefined without bias
};
TORCH_MODULE(ColumnParallelLinear);

struct RowParallelLinearOptions {
  RowParallelLinearOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);  // of the whole layer; each rank holds in_features / group size
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(bool, input_is_parallel) = true;
  TORCH_ARG(Group, group) = Group::single();
};

// Linear layer with the input features sharded across the group (rowwise): input [*, in_features /
// world], this rank's features (input_is_parallel=false: [*, in_features], replicated) -> [*,
// out_features], complete on every rank after one all-reduce. Rank r holds the columns
// [r * in_features / world, (r + 1) * in_features / world) of the dense weight and the whole bias.
// forward/backward: torch_mp::row_parallel_linear.
class RowParallelLinearImpl : public torch::nn::Cloneable<RowParallelLinearImpl> {
 public:
  explicit RowParallelLinearImpl(RowParallelLinearOptions options);
  void reset() override;
  at::Tensor forward(const at::Tensor& input);

  RowParallelLinearOptions options;
  at::Tensor weight;  // [out_features, in_features / group size]
  at::Tensor bias;    // [out_features], replicated, added once after the reduction
};
TORCH_MODULE(RowParallelLinear);

struct VocabParallelEmbeddingOptions {
  VocabParallelEmbeddingOptions(int64_t num_embeddings, int64_t embedding_dim)
      : num_embeddings_(num_embeddings), embedding_dim_(embedding_dim) {}
  TORCH_ARG(int64_t, num_embeddings);
  TORCH_ARG(int64_t, embedding_dim);
  TORCH_ARG(Group, group) = Group::single();
};

// Embedding with the vocabulary rows sharded across the group: input [*] integer ids over the whole
// vocabulary -> [*, embedding_dim], the full embeddings on every rank after one all-reduce. Rank r
// holds the rows [vocab_start(), vocab_start() + num_embeddings / world). Initialized N(0, 1) as
// torch::nn::Embedding is. forward/backward: torch_mp::vocab_parallel_embedding.
class VocabParallelEmbeddingImpl : public torch::nn::Cloneable<VocabParallelEmbeddingImpl> {
 public:
  explicit VocabParallelEmbeddingImpl(VocabParallelEmbeddingOptions options);
  void reset() override;
  at::Tensor forward(const at::Tensor& input);
  // The first vocabulary row this rank holds: r * num_embeddings / world.
  int64_t vocab_start() const;

  VocabParallelEmbeddingOptions options;
  at::Tensor weight;  // [num_embeddings / group size, embedding_dim]
};
TORCH_MODULE(VocabParallelEmbedding);

// This rank's shard of a dense layer, copied (the dense layer is not changed): with every rank's
// shard, the parallel layers compute what `dense` does, forward and backward. The options (bias) are
// the dense layer's; group.rank picks the shard. c10::ValueError as the constructors raise it.
ColumnParallelLinear column_parallel_from_dense(const torch::nn::Linear& dense, const Group& group,
                                                bool gather_output = false);
RowParallelLinear row_parallel_from_dense(const torch::nn::Linear& dense, const Group& group,
                                          bool input_is_parallel = true);
VocabParallelEmbedding vocab_parallel_from_dense(const torch::nn::Embedding& dense, const Group& group);

struct ParallelDropoutOptions {
  /* implicit */ ParallelDropoutOptions(double p = 0.5) : p_(p) {}
  // The probability of zeroing an element, in [0, 1].
  TORCH_ARG(double, p) = 0.5;
  // The input's last dim is this rank's block (in rank order) of the dense activations' last dim,
  // as after a colwise layer; false: the input is the dense activations, replicated.
  TORCH_ARG(bool, sharded) = false;
  TORCH_ARG(Group, group) = Group::single();
  // The stream the masks are drawn from, the same state on every rank of the group; unset: the
  // default CPU generator (seed every rank alike with torch::manual_seed). Ranks that are threads of
  // one process share that one and need a generator each, seeded alike.
  TORCH_ARG(std::optional<at::Generator>, generator) = std::nullopt;
};

// torch::nn::Dropout under tensor parallelism with the dense model's masks: in training mode each
// rank draws the mask at the dense activations' shape ([*, last dim x world] when sharded) from the
// shared stream, exactly as torch::nn::Dropout on the dense model draws it on the CPU (Bernoulli(1 -
// p) in element order, scaled by 1 / (1 - p)), and keeps its block of the last dim. So the same seed
// gives the dense model's outputs and gradients with dropout on, whatever the group size (Python:
// torch_mp._tensor_parallel.dropout, which draws at the dense shape in the same way). Megatron-Core's
// RNG tracker instead gives each tp rank a stream of its own for sharded regions (masks that differ
// from the dense model's); torch_mp keeps the dense numbers, at the cost of drawing world times the
// elements. Identity in eval mode. input [*, features] (sharded: features = this rank's block),
// contiguous CPU tensors. Errors: c10::ValueError for p outside [0, 1] (constructor), a 0-dim or
// CUDA input when sharded (forward).
class ParallelDropoutImpl : public torch::nn::Cloneable<ParallelDropoutImpl> {
 public:
  explicit ParallelDropoutImpl(ParallelDropoutOptions options = {});
  void reset() override;
  at::Tensor forward(const at::Tensor& input);

  ParallelDropoutOptions options;
};
TORCH_MODULE(ParallelDropout);

struct VocabParallelCrossEntropyLossOptions {
  TORCH_ARG(Group, group) = Group::single();
  // Targets equal to it add nothing to the loss (nor to the count "mean" divides by).
  TORCH_ARG(int64_t, ignore_index) = -100;
  // "mean" (over targets other than ignore_index), "sum" or "none": torch::nn::CrossEntropyLoss's
  // reductions.
  TORCH_ARG(std::string, reduction) = "mean";
};

// The cross-entropy loss (in nats) of logits sharded evenly on the vocabulary (last) dim in rank
// order, never gathered (torch::nn::CrossEntropyLoss's counterpart): forward(logits [*, vocab /
// world], rank r holding the classes [r * vocab / world, (r + 1) * vocab / world); target [*]
// integer class ids over the whole vocabulary) -> a scalar ("mean", "sum") or [*] ("none", 0 where
// target == ignore_index). forward/backward: the per-target op torch_mp::vocab_parallel_cross_entropy
// of ops.h (with this rank's vocab_start), then the reduction. The constructor raises
// c10::ValueError for another reduction; forward raises what that op raises. Python:
// torch_mp.nn.vocab_parallel_cross_entropy.
class VocabParallelCrossEntropyLossImpl : public torch::nn::Cloneable<VocabParallelCrossEntropyLossImpl> {
 public:
  explicit VocabParallelCrossEntropyLossImpl(VocabParallelCrossEntropyLossOptions options = {});
  void reset() override;
  at::Tensor forward(const at::Tensor& logits, const at::Tensor& target);

  VocabParallelCrossEntropyLossOptions options;
};
TORCH_MODULE(VocabParallelCrossEntropyLoss);

} // namespace torch_mp::nn
