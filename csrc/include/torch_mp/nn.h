#pragma once

// Tensor-parallel layers for LibTorch programs: torch::nn module holders over the torch_mp operators.
// Each can be built from a dense torch::nn layer (`from_dense`), taking this rank's slice.
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

// Linear layer with the output features split across the group; the input is replicated.
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

// Linear layer with the input features split across the group; the output is complete on every rank.
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

// Embedding with the vocabulary rows split across the group; every rank returns full embeddings.
class VocabParallelEmbeddingImpl : public torch::nn::Cloneable<VocabParallelEmbeddingImpl> {
 public:
  explicit VocabParallelEmbeddingImpl(VocabParallelEmbeddingOptions options);
  void reset() override;
  at::Tensor forward(const at::Tensor& input);
  int64_t vocab_start() const;

  VocabParallelEmbeddingOptions options;
  at::Tensor weight;  // [num_embeddings / group size, embedding_dim]
};
TORCH_MODULE(VocabParallelEmbedding);

// This rank's slice of a dense layer: the sharded layer computes exactly what `dense` does.
ColumnParallelLinear column_parallel_from_dense(const torch::nn::Linear& dense, const Group& group,
                                                bool gather_output = false);
RowParallelLinear row_parallel_from_dense(const torch::nn::Linear& dense, const Group& group,
                                          bool input_is_parallel = true);
VocabParallelEmbedding vocab_parallel_from_dense(const torch::nn::Embedding& dense, const Group& group);

// Cross entropy over logits sharded on the vocabulary (last) dim in rank order, never gathered.
// reduction: "mean" (over targets other than ignore_index), "sum" or "none".
at::Tensor vocab_parallel_cross_entropy(
    const at::Tensor& logits,
    const at::Tensor& target,
    const Group& group,
    int64_t ignore_index = -100,
    const std::string& reduction = "mean");

} // namespace torch_mp::nn
