#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

TEST(ToDevice, ForwardIsAFreshCopy) {
  auto x = torch::randn({4, 3});
  auto y = torch_mp::to_device(x, torch::kCPU);
  EXPECT_TRUE(torch::equal(x, y));
  EXPECT_NE(x.data_ptr(), y.data_ptr());
}

TEST(ToDevice, BackwardReturnsGradientToSource) {
  auto x = torch::randn({4, 3}, torch::requires_grad());
  auto weight = torch::randn({3, 2});
  torch::matmul(torch_mp::to_device(x, torch::kCPU), weight).sum().backward();
  ASSERT_TRUE(x.grad().defined());
  EXPECT_TRUE(torch::allclose(x.grad(), weight.sum(1).expand({4, 3})));
}

TEST(ToDevice, DoubleBackward) {
  auto x = torch::randn({5}, torch::dtype(torch::kDouble).requires_grad(true));
  auto y = torch_mp::to_device(x, torch::kCPU).pow(3).sum();
  auto [grad] = std::array<torch::Tensor, 1>{torch::autograd::grad({y}, {x}, {}, true, true)[0]};
  grad.sum().backward();
  EXPECT_TRUE(torch::allclose(x.grad(), 6 * x.detach()));
}

TEST(ToDevice, SameOperatorAsThroughTheDispatcher) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("torch_mp::to_device", "");
  EXPECT_EQ(op.schema().name(), "torch_mp::to_device");
}

TEST(ToDevice, UnavailableDeviceIsAValueError) {
  if (torch::cuda::device_count() >= 8) {
    GTEST_SKIP() << "this machine has a cuda:7";
  }
  try {
    torch_mp::to_device(torch::randn({2}), torch::Device("cuda:7"));
    FAIL() << "expected an error";
  } catch (const c10::ValueError& error) {
    EXPECT_NE(std::string(error.what()).find("device 'cuda:7' is not available"), std::string::npos)
        << error.what();
  }
}
