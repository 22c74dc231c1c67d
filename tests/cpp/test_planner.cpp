// torch_mp::plan and torch_mp::planner: the cost model against closed forms (the bubble replayed
// from the schedules, the memory sums), the search (deterministic for a fixed cost table, never a
// layout over the limit, a clear refusal naming the smallest memory that fits), and the measured
// cost table of a Sequential (its saved bytes, parameter bytes; the model left as found).
#include <gtest/gtest.h>

#include <random>

#include <torch/torch.h>
#include <torch_mp/planner.h>

#include "dense.h"
#include "error_of.h"

namespace {

namespace planner = torch_mp::planner;

// `layers` equal layers: `forward` and `backward` seconds a row, `param` bytes of matrices and
// `activation` saved bytes a row each, 256-byte outputs a row, tensor parallelism dividing `heads`.
planner::CostTable planner_table(int64_t layers = 4, double forward = 1e-3, double backward = 2e-3,
                                 int64_t param = 1 << 20, int64_t activation = 1 << 12, int64_t heads = 4) {
  planner::CostTable t;
  for (int64_t i = 0; i < layers; ++i) {
    t.layers.push_back("layers." + std::to_string(i));
    t.forward.push_back({0.0, forward});
    t.backward.push_back({0.0, backward});
    t.param_bytes.push_back(param);
    t.sharded_param_bytes.push_back(param);
    t.activation_bytes.push_back(activation);
  }
  t.boundary_bytes = 256;
  t.alpha_s = 1e-5;
  t.beta_s_per_byte = 1e-10;
  t.tp_must_divide = {heads};
  t.sequence_parallel = true;
  return t;
}

planner::StageTimes planner_uniform(int64_t stages, double f, double b, double w) {
  return {std::vector<double>(stages, f), std::vector<double>(stages, b), std::vector<double>(stages, w)};
}

TEST(Planner, SimulatedSchedulesHaveTheClosedFormBubbles) {
  // GPipe and 1F1B, equal stages, free sends: (chunks + stages - 1)(F + B) (Huang et al. 2019).
  for (const auto* schedule : {"gpipe", "1f1b"}) {
    EXPECT_DOUBLE_EQ(planner::simulate(schedule, 4, 8, planner_uniform(4, 1, 2, 0), 0.0), 33.0) << schedule;
  }
  // ZB-H1 with F = B = W = 1: 8 x 3 + 3 (Qi et al. 2024, bubble (p - 1)(F + B - W)).
  EXPECT_DOUBLE_EQ(planner::simulate("zb_h1", 4, 8, planner_uniform(4, 1, 1, 1), 0.0), 27.0);
  // Interleaved 1F1B, two stages per rank: (2 chunks + p - 1) x 3 (Narayanan et al. 2021).
  EXPECT_DOUBLE_EQ(planner::simulate("interleaved_1f1b", 4, 8, planner_uniform(8, 1, 2, 0), 0.0), 57.0);
  // ZB-V: 6 m + p - 1.
  EXPECT_DOUBLE_EQ(planner::simulate("zbv", 4, 8, planner_uniform(8, 1, 1, 1), 0.0), 51.0);
}

TEST(Planner, RanksSharingCoresComputeFasterWhileOthersWait) {
  // Two ranks on one core: alone, a rank runs twice as fast as the table (measured with both busy).
  // The values of Python's test_ranks_sharing_cores_compute_faster_while_others_wait.
  EXPECT_DOUBLE_EQ(planner::simulate("gpipe", 2, 1, planner_uniform(2, 1, 2, 0), 0.0, {2.0, 1.0}), 3.0);
  EXPECT_DOUBLE_EQ(planner::simulate("gpipe", 2, 2, planner_uniform(2, 1, 2, 0), 0.0, {2.0, 1.0}), 6.0);
  auto costs = planner_table(2, 1e-3, 2e-3, 1000, 1000, 1);
  costs.host_cores = 1.0;
  costs.host_ranks = 4;
  // pp 2 of 4 ranks on one core (tp or dp 2 each): one pipeline rank busy is 2 ranks, two are 4.
  EXPECT_EQ(costs.speedup(2), (std::vector<double>{2.0, 1.0}));
  costs.host_cores = 0.0;
  EXPECT_TRUE(costs.speedup(2).empty());
}

TEST(Planner, PeakMemoryIsTheLargestPhase) {
  // 4 layers of 1 MiB fp32 on pp 2: 2 MiB of parameters, 2 of gradients, 4 of AdamW per stage; 1F1B
  // with 4 micro-batches of 2 rows: 2 in flight on stage 0, 1 on stage 1 plus the gradients of 3
  // received inputs (256 bytes a row). The values of Python's test_peak_memory_is_the_largest_phase.
  const auto costs = planner_table();
  const int64_t mib = 1 << 20;
  planner::Layout layout{2, 1, 1, "1f1b", 4, "never", false, {2, 2}, 8};
  const int64_t one = 2 * 4096 * 2;
  const int64_t inputs = 3 * 256 * 2;
  // A backward that adds to existing gradients has half a layer's weight gradients in flight.
  const int64_t accumulated = mib / 2;
  EXPECT_EQ(planner::peak_bytes(costs, layout),
            (std::vector<int64_t>{8 * mib + accumulated + 2 * one, 8 * mib + accumulated + one + inputs}));
  // One micro-batch: the step's end holds every gradient and the last stage's kept input gradient.
  auto single = layout;
  single.chunks = 1;
  EXPECT_EQ(planner::peak_bytes(costs, single), (std::vector<int64_t>{8 * mib, 8 * mib + 8 * 256}));
  // GPipe: every forward first; at the second backward's start 3 in flight with the gradients and
  // one finished micro-batch's input gradient.
  layout.schedule = "gpipe";
  EXPECT_EQ(planner::peak_bytes(costs, layout),
            (std::vector<int64_t>{8 * mib + accumulated + 3 * one, 8 * mib + accumulated + 3 * one + inputs / 3}));
  layout.schedule = "1f1b";
  layout.checkpoint = "always";
  EXPECT_EQ(planner::peak_bytes(costs, layout),
            (std::vector<int64_t>{8 * mib + accumulated + 2 * 256 * 2 + one,
                                  8 * mib + accumulated + 256 * 2 + one + inputs}));
  // Two stages per rank: ZB-V holds 1F1B's first rank's 8 A on every rank, interleaved 11 A down to 5 A.
  auto flat = planner_table(8, 1e-3, 2e-3, 0, 1000);
  flat.boundary_bytes = 0;
  planner::Layout zbv{4, 1, 1, "zbv", 8, "never", false, std::vector<int64_t>(8, 1), 8};
  EXPECT_EQ(planner::peak_bytes(flat, zbv), std::vector<int64_t>(4, 8000));
  zbv.schedule = "interleaved_1f1b";
  EXPECT_EQ(planner::peak_bytes(flat, zbv), (std::vector<int64_t>{11000, 9000, 7000, 5000}));
}

TEST(Planner, PlanIsDeterministicForAFixedCostTable) {
  const auto costs = planner_table(8, 1e-3, 2e-3, 1 << 16, 1 << 10);
  const auto first = planner::search(costs, 4, 64 << 20, 16);
  for (int i = 0; i < 3; ++i) {
    const auto again = planner::search(costs, 4, 64 << 20, 16);
    EXPECT_EQ(again.chosen.layout, first.chosen.layout);
    EXPECT_EQ(again.to_string(), first.to_string());
  }
  EXPECT_NE(first.to_string().find("chosen: pp "), std::string::npos) << first.to_string();
}

TEST(Planner, NeverProposesALayoutOverTheLimit) {
  std::mt19937 random(7);
  std::uniform_int_distribution<int64_t> layers(1, 8);
  std::uniform_int_distribution<int64_t> exponent(10, 22);
  std::uniform_real_distribution<double> seconds(1e-4, 1e-2);
  for (int trial = 0; trial < 40; ++trial) {
    auto costs = planner_table(layers(random), seconds(random), seconds(random), int64_t{1} << exponent(random),
                               int64_t{1} << exponent(random), trial % 3 ? 4 : 1);
    costs.output_bytes = int64_t{1} << exponent(random);
    const int64_t memory = int64_t{1} << (exponent(random) + 4);
    const int64_t world = int64_t{1} << (trial % 4);
    try {
      const auto plan = planner::search(costs, world, memory, 8);
      EXPECT_LE(plan.chosen.peak(), memory);
      EXPECT_EQ(planner::peak_bytes(costs, plan.chosen.layout), plan.chosen.peak_bytes);
      for (const auto& c : plan.alternatives) {
        EXPECT_LE(c.peak(), memory);
        EXPECT_GE(c.step_s, plan.chosen.step_s - 1e-9);
      }
      for (const auto& c : plan.rejected) {
        EXPECT_GT(c.peak(), memory);
        EXPECT_EQ(c.reason.rfind("does not fit (needs ", 0), 0u) << c.reason;
      }
    } catch (const c10::ValueError& error) {
      // Only a refusal because nothing fits, or no layout runs at all (more stages than layers).
      EXPECT_NE(std::string(error.what()).find("no layout"), std::string::npos) << error.what();
    }
  }
}

TEST(Planner, RefusesWhenNothingFitsNamingTheSmallestMemory) {
  const auto costs = planner_table();
  int64_t smallest = std::numeric_limits<int64_t>::max();
  for (const auto& layout : planner::layouts(costs, 4, 8)) {
    const auto peaks = planner::peak_bytes(costs, layout);
    smallest = std::min(smallest, *std::max_element(peaks.begin(), peaks.end()));
  }
  const auto message = error_of([&] { planner::search(costs, 4, 1 << 20, 8); });
  EXPECT_NE(message.find("device_memory = 1.000 MiB (1048576 bytes) fits no layout"), std::string::npos) << message;
  EXPECT_NE(message.find("the smallest needs " + planner::format_bytes(static_cast<double>(smallest)) + " (" +
                         std::to_string(smallest) + " bytes"),
            std::string::npos)
      << message;
  // That much fits.
  EXPECT_EQ(planner::search(costs, 4, smallest, 8).chosen.peak(), smallest);
  // Bad arguments name themselves.
  EXPECT_NE(error_of([&] { planner::search(costs, 0, 1 << 30, 8); }).find("world_size = 0"), std::string::npos);
  EXPECT_NE(error_of([&] { planner::search(costs, 4, 1 << 30, 8, planner::SearchOptions().schedules({"pipedream"})); })
                .find("schedules = [ 'pipedream' ]"),
            std::string::npos);
  auto short_table = costs;
  short_table.activation_bytes.pop_back();
  EXPECT_NE(error_of([&] { planner::search(short_table, 4, 1 << 30, 8); }).find("costs.activation_bytes has 3"),
            std::string::npos);
}

TEST(Planner, MeasuresASequentialsCostsAndLeavesItAsFound) {
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 4));
  const auto sample = torch::randn({6, 8});
  const auto before = model->forward(sample);
  const auto costs = torch_mp::measure_costs(model, sample);
  EXPECT_EQ(costs.layers, (std::vector<std::string>{"0", "1", "2"}));
  // The first Linear keeps its input (8 floats a row), ReLU its output (16 floats; the second Linear
  // saves that same tensor, counted once); the first Linear's output is not kept.
  EXPECT_EQ(costs.activation_bytes, (std::vector<int64_t>{32, 64, 0}));
  EXPECT_EQ(costs.param_bytes, (std::vector<int64_t>{(8 * 16 + 16) * 4, 0, (16 * 4 + 4) * 4}));
  EXPECT_EQ(costs.sharded_param_bytes, (std::vector<int64_t>{8 * 16 * 4, 0, 16 * 4 * 4}));
  EXPECT_EQ(costs.boundary_bytes, 64);
  EXPECT_EQ(costs.output_bytes, 16);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_GE(costs.forward[i].at(6), 0.0);
    EXPECT_GT(costs.forward[i].at(6) + costs.backward[i].at(6), 0.0);
  }
  // Left as found: no gradients, the same numbers.
  for (const auto& p : model->parameters()) {
    EXPECT_FALSE(p.grad().defined());
  }
  EXPECT_TRUE(torch::equal(model->forward(sample), before));
}

TEST(Planner, PlansASequentialOverPipelineAndDataParallelOnly) {
  torch::manual_seed(0);
  torch::nn::Sequential model;
  for (int i = 0; i < 4; ++i) {
    model->push_back(torch::nn::Linear(32, 32));
    model->push_back(torch::nn::Tanh());
  }
  const auto sample = torch::randn({4, 32});
  const auto plan = torch_mp::plan(model, 4, int64_t{1} << 30, 16, sample);
  EXPECT_EQ(plan.chosen.layout.tp, 1);
  EXPECT_EQ(plan.chosen.layout.pp * plan.chosen.layout.dp, 4);
  for (const auto& c : plan.alternatives) {
    EXPECT_EQ(c.layout.tp, 1);
  }
  // The chosen one is the best the cost model sees, and the plan is its search on the measured table.
  const auto again = planner::search(plan.costs, 4, int64_t{1} << 30, 16,
                                     planner::SearchOptions().model_name("torch::nn::Sequential"));
  EXPECT_EQ(again.to_string(), plan.to_string());
  const auto message = error_of([&] { torch_mp::plan(model, 4, 1024, 16, sample); });
  EXPECT_NE(message.find("fits no layout of torch::nn::Sequential on 4 ranks"), std::string::npos) << message;
}

} // namespace
