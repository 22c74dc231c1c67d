// torch_mp::tensor_parallel on a torch::nn::Sequential, two ranks, against the dense model.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "two_ranks.h"

namespace {

torch::nn::Sequential make_model() {
  return torch::nn::Sequential(
      torch::nn::Embedding(12, 8),
      torch::nn::Linear(8, 32), torch::nn::GELU(), torch::nn::Linear(32, 8),
      torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 8));
}

const torch_mp::TensorParallelPlan kPlan = {{"0", "vocab"}, {"[14]", "colwise"}, {"[36]", "rowwise"}};

} // namespace

TEST(TensorParallel, SequentialMatchesDenseThroughAnOptimizerStep) {
  torch::manual_seed(0);
  const auto dense = make_model();
  const auto ids = torch::randint(0, 12, {3, 5});
  torch_mp::testing::run_two_ranks("wrapper", [&](const torch_mp::Group& group) {
    auto reference = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(dense->clone());
    auto sharded = torch_mp::tensor_parallel(torch::nn::Sequential(
        std::dynamic_pointer_cast<torch::nn::SequentialImpl>(dense->clone())), kPlan, group);
    EXPECT_EQ(sharded->named_parameters().keys(), reference->named_parameters().keys());
    EXPECT_EQ(sharded->named_parameters()["1.weight"].size(0), 16);  // half of the 32 outputs

    torch::optim::SGD reference_optimizer(reference->parameters(), 0.1);
    torch::optim::SGD sharded_optimizer(sharded->parameters(), 0.1);
    for (int step = 0; step < 2; ++step) {
      auto expected = reference->forward(ids);
      auto actual = sharded->forward(ids);
      EXPECT_TRUE(torch::allclose(actual, expected, 1e-4, 1e-5)) << "step " << step;
      reference_optimizer.zero_grad();
      sharded_optimizer.zero_grad();
      expected.square().mean().backward();
      actual.square().mean().backward();
      reference_optimizer.step();
      sharded_optimizer.step();
    }
  });
}

TEST(TensorParallel, BadPlansAreClearErrors) {
  const auto error_of = [](const torch_mp::TensorParallelPlan& plan) -> std::string {
    try {
      torch_mp::tensor_parallel(make_model(), plan, torch_mp::Group::single());
    } catch (const c10::ValueError& error) {
      return error.what();
    }
    return "no error";
  };
  EXPECT_NE(error_of({{"9", "colwise"}}).find("plan pattern '9' matches no module"), std::string::npos);
  EXPECT_NE(error_of({{"2", "colwise"}}).find("style 'colwise' for '2', a torch::nn::GELUImpl; expected a torch::nn::Linear"),
            std::string::npos)
      << error_of({{"2", "colwise"}});
  EXPECT_NE(error_of({{"1", "vocab"}}).find("expected a torch::nn::Embedding"), std::string::npos);
  EXPECT_NE(error_of({{"1", "diagonal"}}).find("expected colwise, rowwise, vocab or replicate"), std::string::npos);
}
