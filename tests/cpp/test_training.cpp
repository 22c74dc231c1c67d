// torch_mp::get_total_norm and clip_grad_norm_ on a SplitSequential and on a tensor-parallel
// Sequential (two ranks), against torch::nn::utils::clip_grad_norm_ on the dense model.
#include <cmath>
#include <limits>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "dense.h"
#include "two_ranks.h"

namespace {

torch::nn::Sequential make_model() {
  return torch::nn::Sequential(
      torch::nn::Embedding(12, 8),
      torch::nn::Linear(8, 32), torch::nn::GELU(), torch::nn::Linear(32, 8),
      torch::nn::Linear(8, 16), torch::nn::Tanh(), torch::nn::Linear(16, 8));
}

} // namespace

TEST(Training, TensorParallelNormCountsShardsAndReplicasOnce) {
  torch::manual_seed(0);
  const auto dense = make_model();
  const auto ids = torch::randint(0, 12, {3, 5});
  // Layers 4 and 6 stay replicated: counted on rank 0 only.
  const torch_mp::TensorParallelPlan plan = {{"0", "vocab"}, {"1", "colwise"}, {"3", "rowwise"}};
  torch_mp::testing::run_two_ranks("training_norm", [&](const torch_mp::Group& group) {
    auto reference = copy_of(dense);
    auto sharded = torch_mp::tensor_parallel(copy_of(dense), plan, group);
    reference->forward(ids).square().mean().backward();
    sharded->forward(ids).square().mean().backward();
    for (const double norm_type : {2.0, 1.0, std::numeric_limits<double>::infinity()}) {
      const auto expected = dense_norm(*reference, norm_type);
      EXPECT_NEAR(torch_mp::get_total_norm(*sharded, norm_type).item<double>(), expected, 1e-5 * expected)
          << "norm_type " << norm_type;
    }
    const auto expected = torch::nn::utils::clip_grad_norm_(reference->parameters(), 0.05);
    EXPECT_NEAR(torch_mp::clip_grad_norm_(*sharded, 0.05).item<double>(), expected, 1e-5 * expected);
    // After clipping: a replicated layer's gradient is the dense one's, and so is the rowwise shard's
    // columns [r * 16, (r + 1) * 16).
    const auto grads = sharded->named_parameters();
    const auto dense_grads = reference->named_parameters();
    EXPECT_TRUE(torch::allclose(grads["4.weight"].grad(), dense_grads["4.weight"].grad(), 1e-4, 1e-7));
    EXPECT_TRUE(torch::allclose(grads["3.weight"].grad(),
                                dense_grads["3.weight"].grad().narrow(1, group.rank * 16, 16), 1e-4, 1e-7));
  });
}

TEST(Training, SplitSequentialNormIsTheDenseOne) {
  torch::manual_seed(0);
  auto dense = torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::Tanh(), torch::nn::Linear(16, 4));
  auto split = torch_mp::split(copy_of(dense), {torch::kCPU, torch::kCPU});
  const auto x = torch::randn({6, 8});
  dense->forward(x).square().mean().backward();
  split->forward(x).square().mean().backward();
  const auto expected = torch::nn::utils::clip_grad_norm_(dense->parameters(), 0.1);
  EXPECT_NEAR(torch_mp::clip_grad_norm_(*split, 0.1).item<double>(), expected, 1e-5 * expected);
  EXPECT_NEAR(torch_mp::get_total_norm(*split).item<double>(), 0.1, 1e-6);
}

TEST(Training, BadArgumentsAreClearErrors) {
  auto model = make_model();
  const auto message = [&](double max_norm, double norm_type) -> std::string {
    try {
      torch_mp::clip_grad_norm_(*model, max_norm, norm_type);
    } catch (const c10::ValueError& error) {
      return error.what();
    }
    return "no error";
  };
  EXPECT_NE(message(-1.0, 2.0).find("max_norm = -1; expected a number >= 0"), std::string::npos);
  EXPECT_NE(message(1.0, 0.0).find("norm_type = 0; expected a number > 0 or infinity"), std::string::npos);
}
