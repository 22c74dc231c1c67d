#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

namespace {

torch::nn::Sequential make_mlp() {
  return torch::nn::Sequential(
      torch::nn::Linear(8, 32), torch::nn::ReLU(), torch::nn::Linear(32, 32), torch::nn::ReLU(),
      torch::nn::Linear(32, 4));
}

std::vector<torch::Device> two_stages() {
  return {torch::kCPU, torch::kCPU};
}

template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const c10::ValueError& error) {
    return error.what();
  }
  return "no error";
}

} // namespace

TEST(Split, MatchesUnsplitModelThroughAnOptimizerStep) {
  torch::manual_seed(0);
  auto dense = make_mlp();
  auto split = torch_mp::split(
      torch::nn::Sequential(std::dynamic_pointer_cast<torch::nn::SequentialImpl>(dense->clone())),
      two_stages());
  ASSERT_EQ(split->device_map().size(), 5u);

  auto dense_names = dense->named_parameters().keys();
  auto split_names = split->named_parameters().keys();
  EXPECT_EQ(dense_names, split_names);

  torch::optim::Adam dense_optimizer(dense->parameters(), 1e-2);
  torch::optim::Adam split_optimizer(split->parameters(), 1e-2);
  auto input = torch::randn({16, 8});
  for (int step = 0; step < 2; ++step) {
    auto dense_out = dense->forward(input);
    auto split_out = split->forward(input);
    ASSERT_TRUE(torch::allclose(dense_out, split_out, 1e-5, 1e-6));
    dense_out.pow(2).mean().backward();
    split_out.pow(2).mean().backward();
    auto dense_params = dense->named_parameters();
    auto split_params = split->named_parameters();
    for (const auto& name : dense_names) {
      EXPECT_TRUE(torch::allclose(dense_params[name].grad(), split_params[name].grad(), 1e-5, 1e-6)) << name;
    }
    dense_optimizer.step();
    split_optimizer.step();
    dense_optimizer.zero_grad();
    split_optimizer.zero_grad();
  }
  auto dense_params = dense->named_parameters();
  auto split_params = split->named_parameters();
  for (const auto& name : dense_names) {
    EXPECT_TRUE(torch::allclose(dense_params[name], split_params[name], 1e-5, 1e-6)) << name;
  }
}

TEST(Split, ExplicitBalance) {
  auto split = torch_mp::split(make_mlp(), two_stages(), torch_mp::SplitOptions().balance({1, 4}));
  EXPECT_EQ(split->device_map().size(), 5u);
  EXPECT_EQ(split->forward(torch::randn({3, 8})).sizes(), (std::vector<int64_t>{3, 4}));
}

TEST(Split, BalanceBySizeEvensOutBytes) {
  const int64_t unlimited = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(torch_mp::balance_by_size({10, 10, 10, 10}, {unlimited, unlimited}), (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(torch_mp::balance_by_size({40, 10, 10, 10, 10}, {unlimited, unlimited}),
            (std::vector<int64_t>{1, 4}));
  EXPECT_EQ(torch_mp::balance_by_size({10, 10, 10, 10}, {10, unlimited}), (std::vector<int64_t>{1, 3}));
}

TEST(Split, BadInputIsAClearError) {
  EXPECT_NE(error_of([] { torch_mp::split(make_mlp(), two_stages(), torch_mp::SplitOptions().balance({1, 1})); })
                .find("adds up to 2 layers but the model has 5 layers"),
            std::string::npos);
  EXPECT_NE(error_of([] { torch_mp::split(make_mlp(), two_stages(), torch_mp::SplitOptions().max_memory({100, 100})); })
                .find("cannot hold the model"),
            std::string::npos);
  EXPECT_NE(error_of([] { torch_mp::split(torch::nn::Sequential(), two_stages()); }).find("nothing to split"),
            std::string::npos);
  EXPECT_NE(error_of([] { torch_mp::split(make_mlp(), {}); }).find("no devices given"), std::string::npos);
  if (torch::cuda::device_count() < 8) {
    EXPECT_NE(error_of([] { torch_mp::split(make_mlp(), {torch::kCPU, torch::Device("cuda:7")}); })
                  .find("device 'cuda:7' is not available"),
              std::string::npos);
  }
}
