// torch_mp::pipeline_parallel across ranks (threads of this process over one store, Gloo groups)
// against the dense C++ model: loss, every gradient, an SGD step, the forward (on every rank); and
// its errors.
#include <atomic>
#include <future>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "dense.h"
#include "error_of.h"
#include "two_ranks.h"

namespace {

// Nine layers, non-trivial random weights (the default init, seeded).
torch::nn::Sequential make_mlp() {
  torch::manual_seed(0);
  return torch::nn::Sequential(
      torch::nn::Linear(8, 16), torch::nn::Tanh(), torch::nn::Linear(16, 16), torch::nn::Tanh(),
      torch::nn::Linear(16, 16), torch::nn::Tanh(), torch::nn::Linear(16, 16), torch::nn::Tanh(),
      torch::nn::Linear(16, 4));
}

// The dense model's numbers for two SGD steps on one batch: each step's loss, the first step's
// gradients by name, and the forward after the steps.
struct Dense {
  std::vector<double> losses;
  std::map<std::string, at::Tensor> grads;
  at::Tensor output;
};

Dense dense_reference(const torch::nn::Sequential& model, const at::Tensor& x, const at::Tensor& y) {
  auto dense = copy_of(model);
  torch::optim::SGD sgd(dense->parameters(), 0.1);
  Dense out;
  for (int step = 0; step < 2; ++step) {
    sgd.zero_grad();
    auto loss = mse(dense->forward(x), y);
    loss.backward();
    out.losses.push_back(loss.item<double>());
    if (step == 0) {
      for (const auto& item : dense->named_parameters()) {
        out.grads[item.key()] = item.value().grad().clone();
      }
    }
    sgd.step();
  }
  torch::NoGradGuard no_grad;
  out.output = dense->forward(x);
  return out;
}

// Runs two SGD steps of the pipeline on every rank of `world` and checks them against the dense
// model; every parameter of the dense model is held by exactly one rank.
void expect_dense(int64_t world, const std::string& schedule, int64_t chunks) {
  SCOPED_TRACE(schedule + " on " + std::to_string(world) + " ranks, chunks " + std::to_string(chunks));
  const auto model = make_mlp();
  const auto x = torch::randn({11, 8});
  const auto y = torch::randn({11, 4});
  const auto dense = dense_reference(model, x, y);
  std::mutex mutex;
  std::multiset<std::string> held;
  const auto name = "pp_" + schedule + "_" + std::to_string(world) + "_" + std::to_string(chunks);
  torch_mp::testing::run_ranks(world, name, [&](const torch_mp::Group& group) {
    auto pipe = torch_mp::pipeline_parallel(copy_of(model), group,
                                            torch_mp::PipelineOptions().schedule(schedule).chunks(chunks));
    torch::optim::SGD sgd(pipe->parameters(), 0.1);
    for (int step = 0; step < 2; ++step) {
      sgd.zero_grad();
      const auto loss = pipe->train_step(x, y, mse);
      EXPECT_NEAR(loss.item<double>(), dense.losses[step], 1e-6) << "rank " << group.rank << " step " << step;
      if (step == 0) {
        for (const auto& item : pipe->named_parameters()) {
          ASSERT_TRUE(item.value().grad().defined()) << item.key();
          EXPECT_TRUE(torch::allclose(item.value().grad(), dense.grads.at(item.key()), 1e-5, 1e-6))
              << "rank " << group.rank << ": " << item.key();
          std::lock_guard<std::mutex> lock(mutex);
          held.insert(item.key());
        }
      }
      sgd.step();
    }
    const auto output = pipe->forward(x);  // broadcast from the last stage's rank to every rank
    ASSERT_TRUE(output.defined()) << "rank " << group.rank;
    EXPECT_TRUE(torch::allclose(output, dense.output, 1e-5, 1e-6)) << "rank " << group.rank;
  });
  std::multiset<std::string> expected;
  for (const auto& item : model->named_parameters()) {
    expected.insert(item.key());
  }
  EXPECT_EQ(held, expected);
}

} // namespace

TEST(PipelineParallel, MatchesDenseModelOnTwoRanks) {
  at::set_num_threads(1);
  for (const auto* schedule : {"gpipe", "1f1b", "zb_h1", "interleaved_1f1b", "zbv"}) {
    expect_dense(2, schedule, 3);
  }
  expect_dense(2, "1f1b", 1);
}

TEST(PipelineParallel, MatchesDenseModelOnFourRanks) {
  at::set_num_threads(1);
  for (const auto* schedule : {"gpipe", "1f1b", "zb_h1", "interleaved_1f1b", "zbv"}) {
    expect_dense(4, schedule, 5);
  }
}

// Each rank holds only its stages' layers, under the Sequential's names; layers split evenly.
TEST(PipelineParallel, EachRankHoldsOnlyItsStages) {
  const auto model = make_mlp();
  torch_mp::testing::run_two_ranks("pp_held", [&](const torch_mp::Group& group) {
    auto pipe = torch_mp::pipeline_parallel(copy_of(model), group);
    EXPECT_EQ(pipe->stage_layers(), (std::vector<std::pair<int64_t, int64_t>>{{0, 5}, {5, 9}}));
    std::vector<std::string> names;
    for (const auto& item : pipe->named_parameters()) {
      names.push_back(item.key());
    }
    if (group.rank == 0) {
      EXPECT_EQ(names, (std::vector<std::string>{"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}));
    } else {
      EXPECT_EQ(names, (std::vector<std::string>{"6.weight", "6.bias", "8.weight", "8.bias"}));
    }
  });
}

// Every rank gets every rank's F and B events of the step, one per stage and micro-batch.
TEST(PipelineParallel, TimelineHoldsEveryRanksEvents) {
  const auto model = make_mlp();
  torch_mp::testing::run_two_ranks("pp_timeline", [&](const torch_mp::Group& group) {
    auto pipe = torch_mp::pipeline_parallel(copy_of(model), group, torch_mp::PipelineOptions().chunks(3));
    std::vector<torch_mp::pipeline::TimelineEvent> timeline;
    pipe->train_step(torch::randn({6, 8}), torch::randn({6, 4}), mse, &timeline);
    std::map<std::pair<int64_t, std::string>, int> counts;
    for (const auto& event : timeline) {
      EXPECT_LE(event.start, event.end);
      ++counts[{event.stage, event.kind}];
    }
    for (int64_t stage = 0; stage < 2; ++stage) {
      EXPECT_EQ((counts[{stage, "F"}]), 3) << "rank " << group.rank << " stage " << stage;
      EXPECT_EQ((counts[{stage, "B"}]), 3) << "rank " << group.rank << " stage " << stage;
    }
  });
}

// --- bad input: a c10::ValueError naming it, before any activation moves -------------------------

TEST(PipelineParallel, GroupSizeThatDoesNotMatchTheBalance) {
  // Checked before the group is looked up: no group of that name need exist.
  const torch_mp::Group group{"unused", 2, 0};
  EXPECT_NE(error_of([&] {
              torch_mp::pipeline_parallel(make_mlp(), group, torch_mp::PipelineOptions().balance({3, 3, 3}));
            }).find("balance [3, 3, 3] has 3 entries but the group has 2 ranks x stages_per_rank 1 = 2 stages"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              torch_mp::pipeline_parallel(make_mlp(), group, torch_mp::PipelineOptions().balance({4, 4}));
            }).find("balance [4, 4] adds up to 8 layers but the Sequential has 9"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              torch_mp::pipeline_parallel(make_mlp(), group, torch_mp::PipelineOptions().balance({9, 0}));
            }).find("has a stage of 0 layers"),
            std::string::npos);
}

TEST(PipelineParallel, FewerLayersThanStages) {
  const torch_mp::Group group{"unused", 4, 0};
  auto three = torch::nn::Sequential(torch::nn::Linear(2, 2), torch::nn::Tanh(), torch::nn::Linear(2, 2));
  EXPECT_NE(error_of([&] { torch_mp::pipeline_parallel(three, group); })
                .find("the Sequential has 3 layers but the pipeline has 4 stages (group size 4 x stages_per_rank 1)"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              torch_mp::pipeline_parallel(
                  make_mlp(), group, torch_mp::PipelineOptions().schedule("interleaved_1f1b").stages_per_rank(3));
            }).find("the Sequential has 9 layers but the pipeline has 12 stages"),
            std::string::npos);
}

TEST(PipelineParallel, UnknownScheduleAndStagesItDoesNotRun) {
  const torch_mp::Group group{"unused", 2, 0};
  EXPECT_NE(error_of([&] {
              torch_mp::pipeline_parallel(make_mlp(), group, torch_mp::PipelineOptions().schedule("2f2b"));
            }).find("2f2b"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              torch_mp::pipeline_parallel(
                  make_mlp(), group, torch_mp::PipelineOptions().schedule("1f1b").stages_per_rank(2));
            }),
            "no error");
  EXPECT_NE(error_of([&] { torch_mp::pipeline_parallel(make_mlp(), group, torch_mp::PipelineOptions().chunks(0)); })
                .find("chunks is 0; expected at least 1"),
            std::string::npos);
}

TEST(PipelineParallel, OptionsThatDifferBetweenRanks) {
  const auto model = make_mlp();
  torch_mp::testing::run_two_ranks("pp_differ", [&](const torch_mp::Group& group) {
    const auto message = error_of([&] {
      torch_mp::pipeline_parallel(copy_of(model), group,
                                  torch_mp::PipelineOptions().chunks(2 + group.rank).schedule(
                                      group.rank ? "gpipe" : "1f1b"));
    });
    EXPECT_NE(message.find("the ranks disagree (schedule: rank 0 '1f1b', rank 1 'gpipe'; chunks: rank 0 2, rank 1 3)"),
              std::string::npos)
        << message;
  });
}

TEST(PipelineParallel, BatchShapesThatDifferBetweenRanks) {
  const auto model = make_mlp();
  torch_mp::testing::run_two_ranks("pp_shapes", [&](const torch_mp::Group& group) {
    auto pipe = torch_mp::pipeline_parallel(copy_of(model), group);
    const auto message = error_of([&] {
      pipe->train_step(torch::randn({4 + 2 * group.rank, 8}), torch::randn({4 + 2 * group.rank, 4}), mse);
    });
    EXPECT_NE(message.find("input shape: rank 0 [4, 8], rank 1 [6, 8]; target shape: rank 0 [4, 4], rank 1 [6, 4]"),
              std::string::npos)
        << message;
    // Nothing moved: the pipeline still works.
    EXPECT_NO_THROW(pipe->train_step(torch::randn({4, 8}), torch::randn({4, 4}), mse));
  });
}

// The last stage's rank raises the loss function's error; the others learn it from that rank
// instead of waiting for gradients that never come.
TEST(PipelineParallel, LossFunctionThatDoesNotReturnAScalar) {
  const auto model = make_mlp();
  torch_mp::testing::run_two_ranks("pp_loss", [&](const torch_mp::Group& group) {
    auto pipe = torch_mp::pipeline_parallel(copy_of(model), group, torch_mp::PipelineOptions().chunks(2));
    const auto message = error_of([&] {
      pipe->train_step(torch::randn({4, 8}), torch::randn({4, 4}),
                       [](const at::Tensor& out, const at::Tensor& target) { return (out - target).pow(2); });
    });
    EXPECT_NE(message.find("loss_fn returned a tensor of shape [2, 4]; expected a scalar"), std::string::npos)
        << message;
    if (group.rank == 0) {
      EXPECT_NE(message.find("rank 1 stopped the step"), std::string::npos) << message;
    }
  });
}

// A peer that does not answer within the timeout: a CollectiveError naming it and what was awaited.
TEST(PipelineParallel, UnansweredReceiveIsACollectiveErrorNamingThePeer) {
  const auto model = make_mlp();
  torch_mp::testing::run_two_ranks(
      "pp_timeout",
      [&](const torch_mp::Group& group) {
        auto pipe = torch_mp::pipeline_parallel(
            copy_of(model), group,
            torch_mp::PipelineOptions().schedule("gpipe").timeout(std::chrono::milliseconds(1000)));
        auto slow = [&](const at::Tensor& out, const at::Tensor& target) {
          std::this_thread::sleep_for(std::chrono::milliseconds(3000));
          return mse(out, target);
        };
        try {
          pipe->train_step(torch::randn({2, 8}), torch::randn({2, 4}), slow);
          ADD_FAILURE() << "rank " << group.rank << ": the step completed";
        } catch (const torch_mp::CollectiveError& error) {
          if (group.rank == 0) {
            EXPECT_NE(std::string(error.what()).find(
                          "rank 0 of 2 in group 'pp_timeout_rank0' got no answer within 1 s receiving the gradients "
                          "of micro-batch 0 for stage 0 from rank 1"),
                      std::string::npos)
                << error.what();
          }
        } catch (const std::exception& error) {
          EXPECT_EQ(group.rank, 1) << error.what();
        }
      },
      std::chrono::seconds(5));
}
