// The C++ tensor-parallel layers on two ranks against the dense torch::nn layers.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "two_ranks.h"

namespace {

constexpr int64_t kWorld = 2;

void expect_close(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  EXPECT_TRUE(torch::allclose(actual, expected, 1e-5, 1e-6)) << what << "\nactual\n"
                                                             << actual << "\nexpected\n" << expected;
}

at::Tensor shard(const at::Tensor& tensor, int64_t dim, int64_t rank) {
  return tensor.chunk(kWorld, dim)[rank];
}

struct LayerInputs {
  torch::nn::Linear up{torch::nn::LinearOptions(8, 16)};
  torch::nn::Linear down{torch::nn::LinearOptions(16, 8)};
  torch::nn::Embedding embedding{torch::nn::EmbeddingOptions(10, 8)};
  at::Tensor input = torch::randn({3, 5, 8});
  at::Tensor ids = torch::randint(0, 10, {3, 5});
  at::Tensor logits = torch::randn({3, 5, 10});
};

void check_rank(const torch_mp::Group& group, const LayerInputs& shared) {
  const auto rank = group.rank;

  // Private copies: the threads must not accumulate gradients into shared modules.
  auto up = std::dynamic_pointer_cast<torch::nn::LinearImpl>(shared.up->clone());
  auto down = std::dynamic_pointer_cast<torch::nn::LinearImpl>(shared.down->clone());
  auto column = torch_mp::nn::column_parallel_from_dense(torch::nn::Linear(up), group);
  auto row = torch_mp::nn::row_parallel_from_dense(torch::nn::Linear(down), group);

  // MLP block: column-parallel up, row-parallel down.
  auto x_dense = shared.input.clone().requires_grad_();
  auto x_parallel = shared.input.clone().requires_grad_();
  auto y_dense = down->forward(torch::gelu(up->forward(x_dense)));
  auto y_parallel = row->forward(torch::gelu(column->forward(x_parallel)));
  expect_close(y_parallel, y_dense, "mlp forward");
  y_dense.square().sum().backward();
  y_parallel.square().sum().backward();
  expect_close(x_parallel.grad(), x_dense.grad(), "mlp input grad");
  expect_close(column->weight.grad(), shard(up->weight.grad(), 0, rank), "column weight grad");
  expect_close(column->bias.grad(), shard(up->bias.grad(), 0, rank), "column bias grad");
  expect_close(row->weight.grad(), shard(down->weight.grad(), 1, rank), "row weight grad");
  expect_close(row->bias.grad(), down->bias.grad(), "row bias grad");

  // Vocabulary-parallel embedding and cross entropy.
  auto embedding = std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(shared.embedding->clone());
  auto parallel_embedding = torch_mp::nn::vocab_parallel_from_dense(torch::nn::Embedding(embedding), group);
  auto e_dense = embedding->forward(shared.ids);
  auto e_parallel = parallel_embedding->forward(shared.ids);
  expect_close(e_parallel, e_dense, "embedding forward");
  e_dense.sum().backward();
  e_parallel.sum().backward();
  expect_close(parallel_embedding->weight.grad(), shard(embedding->weight.grad(), 0, rank), "embedding grad");

  auto logits_dense = shared.logits.clone().requires_grad_();
  auto logits_parallel = shard(shared.logits, -1, rank).clone().requires_grad_();
  auto loss_dense = torch::nn::functional::cross_entropy(logits_dense.flatten(0, 1), shared.ids.flatten());
  torch_mp::nn::VocabParallelCrossEntropyLoss loss_fn(
      torch_mp::nn::VocabParallelCrossEntropyLossOptions().group(group));
  auto loss_parallel = loss_fn->forward(logits_parallel, shared.ids);
  expect_close(loss_parallel, loss_dense, "cross entropy");
  loss_dense.backward();
  loss_parallel.backward();
  expect_close(logits_parallel.grad(), shard(logits_dense.grad(), -1, rank), "cross entropy grad");
}

} // namespace

TEST(ParallelLayers, TwoRanksMatchDenseLayers) {
  torch::manual_seed(0);
  const LayerInputs shared;
  torch_mp::testing::run_two_ranks("layers", [&](const torch_mp::Group& group) { check_rank(group, shared); });
}

TEST(ParallelLayers, GroupOfOneIsLocal) {
  torch::manual_seed(0);
  torch::nn::Linear dense(6, 4);
  auto layer = torch_mp::nn::column_parallel_from_dense(dense, torch_mp::Group::single());
  auto x = torch::randn({2, 6});
  expect_close(layer->forward(x), dense->forward(x), "column parallel at world size 1");
}

TEST(ParallelLayers, BadInputIsAClearError) {
  try {
    torch_mp::nn::ColumnParallelLinear(torch_mp::nn::ColumnParallelLinearOptions(4, 6).group({"g", 4, 0}));
    FAIL() << "expected an error";
  } catch (const c10::ValueError& error) {
    EXPECT_NE(std::string(error.what()).find("out_features 6 is not divisible by the group size 4"), std::string::npos);
  }
  try {
    torch_mp::reduce_from_tp(torch::ones({2}), torch_mp::Group{"missing", 2, 0});
    FAIL() << "expected an error";
  } catch (const c10::ValueError& error) {
    EXPECT_NE(std::string(error.what()).find("no process group named 'missing'"), std::string::npos);
  }
}
