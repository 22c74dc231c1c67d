// The operators of ops.h through their typed C++ entry points: to_device (a fresh copy, the gradient
// back to its source device) and all_to_all on two ranks: uneven splits (an empty one included)
// against the rows each rank sent, and its backward, the reverse all-to-all, against the gradients
// each rank holds. Under CPU autocast: the matmul ops in bfloat16, the collectives in their input's dtype.
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "two_ranks.h"

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

// --- autocast ----------------------------------------------------------------------------------

namespace {

// CPU autocast on in bfloat16 for the scope, as torch.autocast("cpu", torch.bfloat16) is.
struct CpuAutocast {
  CpuAutocast() {
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCPU, true);
  }
  ~CpuAutocast() {
    at::autocast::set_autocast_enabled(at::kCPU, false);
    at::autocast::clear_cache();
  }
};

} // namespace

// The autocast kernels are registered in libtorch_mp (csrc/ops/autocast.cpp): a LibTorch program
// gets them. The matmuls give aten::linear's autocast result, the collectives keep what arrives.
TEST(Autocast, MatmulOpsRunInTheAutocastDtypeCollectivesInTheirInputs) {
  const auto group = torch_mp::Group::single();
  auto x = torch::randn({4, 3});
  auto w = torch::randn({2, 3});
  auto b = torch::randn({2});
  at::Tensor column, row, expected, reduced, loss, arrived;
  {
    CpuAutocast autocast;
    column = torch_mp::column_parallel_linear(x, w, b, /*gather_output=*/false, group);
    row = torch_mp::row_parallel_linear(x, w, b, /*input_is_parallel=*/true, group);
    expected = at::linear(x, w, b);
    reduced = torch_mp::reduce_from_tp(x, group);
    // What arrives from an earlier autocast op: a bf16 input for a float32 weight.
    arrived = torch_mp::column_parallel_linear(x.to(at::kBFloat16), w, b, /*gather_output=*/false, group);
    loss = torch_mp::vocab_parallel_cross_entropy(column, torch::tensor({0, 1, 1, 0}), 0, -100, group);
  }
  EXPECT_EQ(expected.scalar_type(), at::kBFloat16);
  EXPECT_EQ(column.scalar_type(), at::kBFloat16);
  EXPECT_EQ(row.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(torch::equal(column, expected));
  EXPECT_TRUE(torch::equal(arrived, expected));
  // The row-parallel layer adds its bias after the reduction, in the matmul's dtype.
  EXPECT_TRUE(torch::equal(row, at::linear(x.to(at::kBFloat16), w.to(at::kBFloat16)).add_(b.to(at::kBFloat16))));
  EXPECT_EQ(reduced.scalar_type(), at::kFloat);
  EXPECT_TRUE(torch::equal(reduced, x));
  EXPECT_EQ(loss.scalar_type(), at::kFloat);  // cross entropy in float32, as under aten's autocast
}

// --- all_to_all --------------------------------------------------------------------------------

namespace {

// sends[src][dst]: the rows rank src sends to rank dst.
const std::vector<std::vector<int64_t>> kSends{{2, 0}, {1, 3}};

at::Tensor rows_of(int64_t rank) {
  // Row i of rank r holds 100 * r + i, so each row says where it came from.
  const auto rows = kSends[rank][0] + kSends[rank][1];
  return (torch::arange(rows, torch::kFloat) + 100 * rank).unsqueeze(1).repeat({1, 3});
}

void check_all_to_all_on_rank(const torch_mp::Group& group) {
  const auto rank = group.rank;
  const std::vector<int64_t> output_splits{kSends[0][rank], kSends[1][rank]};
  auto x = rows_of(rank).requires_grad_();
  auto y = torch_mp::all_to_all(x, output_splits, kSends[rank], group);
  std::vector<at::Tensor> expected;
  for (int64_t src = 0; src < 2; ++src) {
    expected.push_back(rows_of(src).narrow(0, rank == 0 ? 0 : kSends[src][0], kSends[src][rank]));
  }
  EXPECT_TRUE(torch::equal(y, torch::cat(expected))) << "rank " << rank << " received\n" << y;
  EXPECT_TRUE(torch::equal(torch_mp::primitives::all_to_all(x.detach(), output_splits, kSends[rank], group), y));

  // Each received row's gradient is its value plus 1000 * this rank: back on its sender, every row
  // of x gets its own value plus 1000 * the rank it went to.
  (y * (y.detach() + 1000 * rank)).sum().backward();
  auto destination = torch::cat({torch::zeros({kSends[rank][0], 1}), torch::ones({kSends[rank][1], 1})});
  EXPECT_TRUE(torch::equal(x.grad(), x.detach() + 1000 * destination)) << "rank " << rank << " grad\n" << x.grad();

  EXPECT_THROW(torch_mp::all_to_all(x, {1}, kSends[rank], group), c10::ValueError);
}

} // namespace

TEST(AllToAll, TwoRanksRouteRowsAndGradientsBack) {
  torch_mp::testing::run_two_ranks("all_to_all", check_all_to_all_on_rank);
}

TEST(AllToAll, GroupOfOneIsACopy) {
  const auto single = torch_mp::Group::single();
  auto x = torch::randn({4, 2}, torch::requires_grad());
  auto y = torch_mp::all_to_all(x, {4}, {4}, single);
  EXPECT_TRUE(torch::equal(y, x));
  y.sum().backward();
  EXPECT_TRUE(torch::equal(x.grad(), torch::ones_like(x)));
  EXPECT_THROW(torch_mp::all_to_all(x, {3}, {4}, single), c10::ValueError);
}
