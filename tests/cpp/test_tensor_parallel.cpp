// torch_mp::tensor_parallel on a torch::nn::Sequential, two ranks, against the dense model.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "error_of.h"
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

// Dropout in training mode draws the dense model's masks: on a colwise layer's sharded output (each
// rank keeps its block of the dense mask) and on replicated activations. The ranks are threads, so
// each passes its own generator seeded as the dense run's default generator was.
TEST(TensorParallel, DropoutDrawsTheDenseMasks) {
  torch::manual_seed(0);
  auto dense = torch::nn::Sequential(
      torch::nn::Embedding(12, 8), torch::nn::Linear(8, 32), torch::nn::GELU(), torch::nn::Dropout(0.3),
      torch::nn::Linear(32, 8), torch::nn::Dropout(0.2), torch::nn::Linear(8, 8));
  const torch_mp::TensorParallelPlan plan = {{"0", "vocab"}, {"1", "colwise"}, {"4", "rowwise"}};
  const auto ids = torch::randint(0, 12, {3, 5});
  auto reference = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(dense->clone());
  reference->train();
  torch::manual_seed(7);
  const auto expected = reference->forward(ids);
  expected.square().mean().backward();
  const auto dense_grads = reference->named_parameters();
  // Dropout is on: the output differs from eval mode's.
  {
    torch::NoGradGuard no_grad;
    reference->eval();
    ASSERT_FALSE(torch::allclose(reference->forward(ids), expected, 1e-3, 1e-4));
  }
  torch_mp::testing::run_two_ranks("tp_dropout", [&](const torch_mp::Group& group) {
    auto sharded = torch_mp::tensor_parallel(
        torch::nn::Sequential(std::dynamic_pointer_cast<torch::nn::SequentialImpl>(dense->clone())), plan, group,
        at::make_generator<at::CPUGeneratorImpl>(7));
    sharded->train();
    const auto actual = sharded->forward(ids);
    EXPECT_TRUE(torch::allclose(actual, expected, 1e-5, 1e-6)) << "rank " << group.rank;
    actual.square().mean().backward();
    const auto grads = sharded->named_parameters();
    EXPECT_TRUE(torch::allclose(grads["1.weight"].grad(),
                                dense_grads["1.weight"].grad().narrow(0, group.rank * 16, 16), 1e-4, 1e-7));
    EXPECT_TRUE(torch::allclose(grads["4.weight"].grad(),
                                dense_grads["4.weight"].grad().narrow(1, group.rank * 16, 16), 1e-4, 1e-7));
    EXPECT_TRUE(torch::allclose(grads["6.weight"].grad(), dense_grads["6.weight"].grad(), 1e-4, 1e-7));
  });
}

TEST(TensorParallel, DropoutProbabilityOutOfRange) {
  EXPECT_NE(error_of([] { torch_mp::nn::ParallelDropout(1.5); })
                .find("ParallelDropout: p = 1.5; expected a probability in [0, 1]"),
            std::string::npos);
}
