// Async TP ops from C++: a sequence-parallel MLP (all_gather_matmul, then matmul_reduce_scatter) on
// two ranks against the dense matmuls, forward and gradients, with one and two chunks per rank.
#include <algorithm>
#include <limits>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "error_of.h"
#include "two_ranks.h"

namespace {

constexpr int64_t kWorld = 2;

// Sums split over ranks and chunks are added in another order than the dense matmul adds them: each
// entry may differ by a few float32 ulps of the largest term summed, wherever the entry itself is small.
void expect_close(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  const auto ulps = 4 * std::numeric_limits<float>::epsilon() * expected.abs().max().item<double>();
  EXPECT_TRUE(torch::allclose(actual, expected, 1e-5, std::max(1e-6, ulps)))
      << what << ": largest difference " << (actual - expected).abs().max().item<float>() << " of values up to "
      << expected.abs().max().item<float>();
}

at::Tensor shard(const at::Tensor& tensor, int64_t dim, int64_t rank) {
  return tensor.chunk(kWorld, dim)[rank];
}

struct MlpInputs {
  at::Tensor input = torch::randn({3, 8, 8});  // [batch, sequence, features]
  at::Tensor up = torch::randn({16, 8});
  at::Tensor gate = torch::randn({16, 8});
  at::Tensor down = torch::randn({8, 16});
  at::Tensor direction = torch::randn({3, 8, 8});
};

void check_rank(const torch_mp::Group& group, const MlpInputs& dense, int64_t chunks) {
  const auto rank = group.rank;
  const auto what = [&](const char* name) { return std::string(name) + " chunks=" + std::to_string(chunks); };
  auto x = dense.input.clone().requires_grad_();
  auto up = dense.up.clone().requires_grad_();
  auto gate = dense.gate.clone().requires_grad_();
  auto down = dense.down.clone().requires_grad_();
  auto y = torch::matmul(torch::silu(torch::matmul(x, gate.t())) * torch::matmul(x, up.t()), down.t());

  auto x_shard = shard(dense.input, 1, rank).clone().requires_grad_();
  auto up_shard = shard(dense.up, 0, rank).clone().requires_grad_();
  auto gate_shard = shard(dense.gate, 0, rank).clone().requires_grad_();
  auto down_shard = shard(dense.down, 1, rank).clone().requires_grad_();
  auto [gathered, products] = torch_mp::all_gather_matmul(x_shard, {gate_shard, up_shard}, 1, group, chunks);
  expect_close(gathered, dense.input, what("gathered"));
  auto y_shard =
      torch_mp::matmul_reduce_scatter(torch::silu(products[0]) * products[1], down_shard, 1, group, chunks);
  expect_close(y_shard, shard(y, 1, rank), what("forward"));

  // A fixed random direction rather than a squared loss, whose gradients reach ~1e4 here: float
  // rounding of such sums, added in another order, exceeds any tolerance on their small entries.
  (y * dense.direction).sum().backward();
  (y_shard * shard(dense.direction, 1, rank)).sum().backward();
  expect_close(x_shard.grad(), shard(x.grad(), 1, rank), what("input grad"));
  expect_close(gate_shard.grad(), shard(gate.grad(), 0, rank), what("gate grad"));
  expect_close(up_shard.grad(), shard(up.grad(), 0, rank), what("up grad"));
  expect_close(down_shard.grad(), shard(down.grad(), 1, rank), what("down grad"));
}

} // namespace

TEST(AsyncTensorParallel, TwoRanksMatchDenseMlp) {
  torch::manual_seed(0);
  const MlpInputs dense;
  for (const int64_t chunks : {1, 2}) {
    torch_mp::testing::run_two_ranks(
        "async_tp" + std::to_string(chunks), [&](const torch_mp::Group& group) { check_rank(group, dense, chunks); });
  }
}

TEST(AsyncTensorParallel, GroupOfOneIsLocal) {
  const auto group = torch_mp::Group::single();
  const auto x = torch::randn({2, 4, 8});
  const auto w = torch::randn({3, 8});
  auto [gathered, products] = torch_mp::all_gather_matmul(x, {w}, 1, group, 2);
  EXPECT_TRUE(torch::equal(gathered, x));
  expect_close(products[0], torch::matmul(x, w.t()), "all_gather_matmul");
  expect_close(torch_mp::matmul_reduce_scatter(x, w, 1, group, 4), torch::matmul(x, w.t()), "matmul_reduce_scatter");
}

TEST(AsyncTensorParallel, BadInputIsAClearError) {
  const auto group = torch_mp::Group::single();
  const auto x = torch::randn({2, 4, 8});
  EXPECT_NE(
      error_of([&] { torch_mp::all_gather_matmul(x, {torch::randn({3, 8})}, 1, group, 3); }).find("chunks=3"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { torch_mp::all_gather_matmul(x, {torch::randn({3, 8})}, 2, group); }).find("features dim"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { torch_mp::matmul_reduce_scatter(x, torch::randn({3, 5}), 1, group); }).find("weight has shape"),
      std::string::npos);
}
