// Pipeline schedules over the whole grid of shapes, and the checker's rules by their messages.
#include <algorithm>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "error_of.h"

namespace pp = torch_mp::pipeline;

namespace {

constexpr auto kF = pp::ActionKind::Forward;
constexpr auto kB = pp::ActionKind::Backward;
constexpr auto kW = pp::ActionKind::Weight;

pp::Action F(int64_t s, int64_t m) {
  return {kF, s, m};
}
pp::Action B(int64_t s, int64_t m) {
  return {kB, s, m};
}
pp::Action W(int64_t s, int64_t m) {
  return {kW, s, m};
}

// Most micro-batches one rank holds at once: forwards run whose last backward action (W where the
// schedule has them, B otherwise) has not.
int64_t most_in_flight(const std::vector<pp::Action>& actions) {
  const bool weights = std::any_of(actions.begin(), actions.end(), [](const auto& a) { return a.kind == kW; });
  const auto release = weights ? kW : kB;
  int64_t in_flight = 0, most = 0;
  for (const auto& action : actions) {
    in_flight += action.kind == kF ? 1 : action.kind == release ? -1 : 0;
    most = std::max(most, in_flight);
  }
  return most;
}

std::string shape(pp::ScheduleKind kind, int64_t ranks, int64_t per_rank, int64_t chunks) {
  return pp::schedule_kind_name(kind) + " on " + std::to_string(ranks) + " ranks x " + std::to_string(per_rank) +
         " stages, " + std::to_string(chunks) + " micro-batches";
}

std::string printed(const std::vector<pp::Action>& actions) {
  std::string out;
  for (const auto& action : actions) {
    out += (out.empty() ? "" : " ") + pp::to_string(action);
  }
  return out;
}

} // namespace

// Ranks 1-8, stages per rank 1-4 (1F1B and ZB-H1: 1; ZB-V: 2), micro-batches 1-32, every kind:
// each schedule passes the checker, and no rank holds more micro-batches than the documented
// warm-up allows (ZB-H1: as many as 1F1B's first rank; ZB-V: twice that, of stages half the size).
TEST(PipelineSchedule, EveryShapeGivesAValidSchedule) {
  int64_t shapes = 0;
  for (const auto kind : {pp::ScheduleKind::GPipe, pp::ScheduleKind::OneFOneB, pp::ScheduleKind::Interleaved1F1B,
                          pp::ScheduleKind::ZeroBubbleH1, pp::ScheduleKind::ZeroBubbleV}) {
    const bool one = kind == pp::ScheduleKind::OneFOneB || kind == pp::ScheduleKind::ZeroBubbleH1;
    const bool v = kind == pp::ScheduleKind::ZeroBubbleV;
    for (int64_t ranks = 1; ranks <= 8; ++ranks) {
      for (int64_t per_rank = v ? 2 : 1; per_rank <= (one ? 1 : v ? 2 : 4); ++per_rank) {
        for (int64_t chunks = 1; chunks <= 32; ++chunks) {
          SCOPED_TRACE(shape(kind, ranks, per_rank, chunks));
          std::vector<std::vector<pp::Action>> schedule;
          ASSERT_NO_THROW(schedule = pp::make_schedule(kind, ranks, per_rank, chunks));
          const auto placement = pp::stage_ranks(kind, ranks, per_rank);
          ASSERT_NO_THROW(pp::check_schedule(schedule, placement, chunks));
          const auto largest_group = chunks < 2 * ranks ? chunks : ranks + chunks % ranks;
          for (int64_t rank = 0; rank < ranks; ++rank) {
            // Every action of the rank's stages, F, B (and W in the zero-bubble schedules), once.
            const auto kinds = kind == pp::ScheduleKind::ZeroBubbleH1 || v ? 3 : 2;
            EXPECT_EQ(schedule[rank].size(), static_cast<size_t>(kinds * per_rank * chunks)) << "rank " << rank;
            int64_t bound = per_rank * chunks; // GPipe: every forward
            if (kind == pp::ScheduleKind::ZeroBubbleH1) {
              bound = ranks;
            } else if (v) {
              bound = 2 * ranks;
            } else if (kind != pp::ScheduleKind::GPipe) {
              bound = per_rank == 1 ? ranks - rank : (ranks - rank - 1) * 2 + (per_rank - 1) * largest_group + 1;
            }
            EXPECT_LE(most_in_flight(schedule[rank]), std::min(bound, per_rank * chunks)) << "rank " << rank;
          }
          ++shapes;
        }
      }
    }
  }
  EXPECT_EQ(shapes, 8 * 32 * (4 + 1 + 4 + 1 + 1));
}

// ZB-V places stage s on rank s for s < ranks and on rank 2 * ranks - 1 - s after: rank 0 holds the
// first and the last stage. Every other kind places stage s on rank s % ranks.
TEST(PipelineSchedule, ZeroBubbleVPlacesStagesInAV) {
  EXPECT_EQ(pp::stage_ranks(pp::ScheduleKind::ZeroBubbleV, 4, 2), (std::vector<int64_t>{0, 1, 2, 3, 3, 2, 1, 0}));
  EXPECT_EQ(pp::stage_ranks(pp::ScheduleKind::Interleaved1F1B, 4, 2), (std::vector<int64_t>{0, 1, 2, 3, 0, 1, 2, 3}));
  EXPECT_EQ(pp::stage_ranks(pp::ScheduleKind::ZeroBubbleH1, 3, 1), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(pp::to_string(W(3, 12)), "3W12");
}

// ZB-H1 on 3 ranks, 5 micro-batches: 1F1B's F and B, rank r's W r micro-batches behind its B.
TEST(PipelineSchedule, ZeroBubbleH1DelaysRankRsWeightsByR) {
  const auto schedule = pp::make_schedule(pp::ScheduleKind::ZeroBubbleH1, 3, 1, 5);
  EXPECT_EQ(printed(schedule[0]), "0F0 0F1 0F2 0B0 0W0 0F3 0B1 0W1 0F4 0B2 0W2 0B3 0W3 0B4 0W4");
  EXPECT_EQ(printed(schedule[1]), "1F0 1F1 1B0 1F2 1B1 1W0 1F3 1B2 1W1 1F4 1B3 1W2 1B4 1W3 1W4");
  EXPECT_EQ(printed(schedule[2]), "2F0 2B0 2F1 2B1 2F2 2B2 2W0 2F3 2B3 2W1 2F4 2B4 2W2 2W3 2W4");
  // Without the W, the F and B are 1F1B's.
  const auto one_f_one_b = pp::make_schedule(pp::ScheduleKind::OneFOneB, 3, 1, 5);
  for (size_t r = 0; r < 3; ++r) {
    std::vector<pp::Action> without_w;
    std::copy_if(schedule[r].begin(), schedule[r].end(), std::back_inserter(without_w),
                 [](const auto& a) { return a.kind != kW; });
    EXPECT_EQ(without_w, one_f_one_b[r]) << "rank " << r;
  }
}

// ZB-V on 2 ranks, 4 micro-batches (the paper's figure 8 shape, torch.distributed.pipelining's
// ScheduleZBVZeroBubble order): rank 0 holds stages 0 and 3, rank 1 stages 1 and 2.
TEST(PipelineSchedule, ZeroBubbleVFollowsThePapersOrder) {
  const auto schedule = pp::make_schedule(pp::ScheduleKind::ZeroBubbleV, 2, 2, 4);
  EXPECT_EQ(
      printed(schedule[0]), "0F0 0F1 0F2 3F0 3B0 3W0 3F1 3B1 3W1 0F3 0B0 0W0 3F2 3B2 3W2 0B1 0W1 3F3 3B3 3W3 0B2 0W2 "
                            "0B3 0W3");
  EXPECT_EQ(
      printed(schedule[1]), "1F0 2F0 1F1 2F1 2B0 2W0 1F2 1B0 1W0 2F2 2B1 2W1 1F3 1B1 1W1 2F3 2B2 2W2 1B2 2B3 1B3 1W2 "
                            "2W3 1W3");
}

// Megatron-Core's order when the micro-batches fill whole groups: 2 ranks, 2 stages each, 4
// micro-batches. Rank 0 warms up with (2 - 0 - 1) * 2 + (2 - 1) * 2 = 4 forwards, rank 1 with 2.
TEST(PipelineSchedule, InterleavedFollowsMegatronOrder) {
  const auto schedule = pp::make_schedule(pp::ScheduleKind::Interleaved1F1B, 2, 2, 4);
  const std::vector<pp::Action> rank0{F(0, 0), F(0, 1), F(2, 0), F(2, 1), F(0, 2), B(2, 0), F(0, 3), B(2, 1),
                                      F(2, 2), B(0, 0), F(2, 3), B(0, 1), B(2, 2), B(2, 3), B(0, 2), B(0, 3)};
  const std::vector<pp::Action> rank1{F(1, 0), F(1, 1), F(3, 0), B(3, 0), F(3, 1), B(3, 1), F(1, 2), B(1, 0),
                                      F(1, 3), B(1, 1), F(3, 2), B(3, 2), F(3, 3), B(3, 3), B(1, 2), B(1, 3)};
  EXPECT_EQ(schedule[0], rank0);
  EXPECT_EQ(schedule[1], rank1);
}

// The shapes the simulation-made schedule failed on (issue 11, item 2.9).
TEST(PipelineSchedule, InterleavedOnThreeAndFourRanks) {
  for (const auto& [ranks, chunks] : {std::pair<int64_t, int64_t>{3, 7}, {4, 16}, {4, 5}, {5, 7}}) {
    SCOPED_TRACE(shape(pp::ScheduleKind::Interleaved1F1B, ranks, 2, chunks));
    const auto schedule = pp::make_schedule(pp::ScheduleKind::Interleaved1F1B, ranks, 2, chunks);
    ASSERT_EQ(schedule.size(), static_cast<size_t>(ranks));
    for (const auto& actions : schedule) {
      EXPECT_EQ(actions.size(), static_cast<size_t>(2 * 2 * chunks));
    }
  }
}

// Each rule of the checker is named in its error: a backward before its forward is reported as
// such, not as the deadlock it also causes.
TEST(PipelineSchedule, CheckerNamesTheRuleBroken) {
  // Rank 1 (the last stage) runs micro-batch 0's backward before its forward.
  const std::vector<std::vector<pp::Action>> backward_first{
      {F(0, 0), F(0, 1), B(0, 0), B(0, 1)}, {B(1, 0), F(1, 0), F(1, 1), B(1, 1)}};
  EXPECT_NE(
      error_of([&] { pp::check_schedule(backward_first, 2, 2); })
          .find("pipeline schedule: rank 1 runs B(stage 1, micro-batch 0) before its forward"),
      std::string::npos);
  // The same on a middle stage of an interleaved schedule: rank 0 swaps its first forward of
  // stage 2 (its second stage) with that stage's backward.
  auto interleaved = pp::make_schedule(pp::ScheduleKind::Interleaved1F1B, 2, 2, 4);
  auto& rank0 = interleaved[0];
  std::iter_swap(
      std::find(rank0.begin(), rank0.end(), F(2, 1)), std::find(rank0.begin(), rank0.end(), B(2, 1)));
  EXPECT_NE(
      error_of([&] { pp::check_schedule(interleaved, 4, 4); })
          .find("rank 0 runs B(stage 2, micro-batch 1) before its forward"),
      std::string::npos);
  // Rank 0 waits for micro-batch 0's gradient before sending micro-batch 1's activation, which rank
  // 1 needs before it runs micro-batch 0's backward.
  const std::vector<std::vector<pp::Action>> deadlock{
      {F(0, 0), B(0, 0), F(0, 1), B(0, 1)}, {F(1, 0), F(1, 1), B(1, 0), B(1, 1)}};
  EXPECT_NE(
      error_of([&] { pp::check_schedule(deadlock, 2, 2); })
          .find("it deadlocks:\n  rank 0 waits in B(stage 0, micro-batch 0) for B(stage 1, micro-batch 0) on rank 1\n"
                "  rank 1 waits in F(stage 1, micro-batch 1) for F(stage 0, micro-batch 1) on rank 0"),
      std::string::npos);
  const std::vector<std::vector<pp::Action>> missing{{F(0, 0), B(0, 0)}, {F(1, 0)}};
  EXPECT_NE(
      error_of([&] { pp::check_schedule(missing, 2, 1); })
          .find("no rank runs B(stage 1, micro-batch 0); expected rank 1 to run it"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { pp::make_schedule(pp::ScheduleKind::OneFOneB, 2, 2, 4); })
          .find("'1f1b' runs one stage per rank but stages_per_rank = 2"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { pp::make_schedule(pp::ScheduleKind::Interleaved1F1B, 2, 2, 0); })
          .find("chunks = 0; expected >= 1 micro-batches"),
      std::string::npos);
}

// W: once per (stage, micro-batch) when a schedule has any, after its B, on the stage's rank; the
// V placement is checked against the placement given.
TEST(PipelineSchedule, CheckerNamesTheWeightRules) {
  const std::vector<std::vector<pp::Action>> weight_first{{F(0, 0), W(0, 0), B(0, 0)}};
  EXPECT_NE(
      error_of([&] { pp::check_schedule(weight_first, 1, 1); })
          .find("pipeline schedule: rank 0 runs W(stage 0, micro-batch 0) before its backward"),
      std::string::npos);
  const std::vector<std::vector<pp::Action>> one_weight_missing{
      {F(0, 0), F(0, 1), B(0, 0), W(0, 0), B(0, 1)}, {F(1, 0), B(1, 0), W(1, 0), F(1, 1), B(1, 1), W(1, 1)}};
  EXPECT_NE(
      error_of([&] { pp::check_schedule(one_weight_missing, 2, 2); })
          .find("no rank runs W(stage 0, micro-batch 1); expected rank 0 to run it (a schedule with W runs one for "
                "every backward)"),
      std::string::npos);
  const std::vector<std::vector<pp::Action>> twice{{F(0, 0), B(0, 0), W(0, 0), W(0, 0)}};
  EXPECT_NE(
      error_of([&] { pp::check_schedule(twice, 1, 1); }).find("rank 0 runs W(stage 0, micro-batch 0) twice"),
      std::string::npos);
  // ZB-V's actions checked against the round-robin placement: stage 3 is not rank 1's.
  const auto v = pp::make_schedule(pp::ScheduleKind::ZeroBubbleV, 2, 2, 4);
  EXPECT_NE(
      error_of([&] { pp::check_schedule(v, 4, 4); }).find("rank 0 runs F(stage 3, micro-batch 0) but stage 3 lives on rank 1"),
      std::string::npos);
  EXPECT_NO_THROW(pp::check_schedule(v, pp::stage_ranks(pp::ScheduleKind::ZeroBubbleV, 2, 2), 4));
  // W waits for nothing: a W right after its B never deadlocks, and a W moved early past another
  // rank's messages does not either.
  auto h1 = pp::make_schedule(pp::ScheduleKind::ZeroBubbleH1, 2, 1, 3);
  EXPECT_NO_THROW(pp::check_schedule(h1, 2, 3));
  EXPECT_NE(
      error_of([&] { pp::make_schedule(pp::ScheduleKind::ZeroBubbleV, 2, 1, 4); })
          .find("'zbv' runs two stages per rank (in a V) but stages_per_rank = 1; expected 2"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { pp::make_schedule(pp::ScheduleKind::ZeroBubbleH1, 2, 2, 4); })
          .find("'zb_h1' runs one stage per rank but stages_per_rank = 2; expected 1, or schedule 'zbv'"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { pp::parse_schedule_kind("zb"); })
          .find("expected 'gpipe', '1f1b', 'interleaved_1f1b', 'zb_h1' or 'zbv'"),
      std::string::npos);
}

// The B/W split of a linear layer: B returns the input gradient only and leaves .grad of the weight
// and bias untouched; W adds exactly at::linear's weight and bias gradients.
TEST(DeferredLinear, BackwardDefersTheWeightGradientToW) {
  torch::manual_seed(0);
  const auto input = torch::randn({3, 5, 4}, torch::requires_grad());
  const auto weight = torch::randn({6, 4}, torch::requires_grad());
  const auto bias = torch::randn({6}, torch::requires_grad());
  const auto grad = torch::randn({3, 5, 6});
  const auto x = input.detach().clone().requires_grad_();
  const auto w = weight.detach().clone().requires_grad_();
  const auto b = bias.detach().clone().requires_grad_();
  torch::linear(x, w, b).backward(grad);

  const int64_t slot = 424242;
  const auto y = pp::deferred_linear(input, weight, bias, slot);
  EXPECT_TRUE(torch::allclose(y, torch::linear(x, w, b)));
  y.backward(grad);
  EXPECT_TRUE(torch::allclose(input.grad(), x.grad()));
  EXPECT_FALSE(weight.grad().defined());
  EXPECT_FALSE(bias.grad().defined());
  EXPECT_EQ(pp::pending_weight_gradients(slot), 1);
  EXPECT_EQ(pp::run_weight_gradients(slot), 1);
  EXPECT_EQ(pp::pending_weight_gradients(slot), 0);
  EXPECT_TRUE(torch::allclose(weight.grad(), w.grad(), 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(bias.grad(), b.grad(), 1e-5, 1e-6));
  // A second micro-batch's W adds to .grad, as autograd accumulates.
  pp::deferred_linear(input, weight, bias, slot).backward(grad);
  pp::run_weight_gradients(slot);
  EXPECT_TRUE(torch::allclose(weight.grad(), 2 * w.grad(), 1e-5, 1e-6));
  // slot < 0: every gradient in backward, as at::linear.
  const auto v = weight.detach().clone().requires_grad_();
  pp::deferred_linear(input, v, std::nullopt, -1).backward(grad);
  EXPECT_TRUE(torch::allclose(v.grad(), w.grad(), 1e-5, 1e-6));
  // A weight that is not a leaf keeps its gradient flowing in B.
  const auto scale = torch::ones({}, torch::requires_grad());
  pp::deferred_linear(input, w.detach() * scale, std::nullopt, slot).backward(grad);
  EXPECT_EQ(pp::pending_weight_gradients(slot), 0);
  EXPECT_TRUE(scale.grad().defined());
  pp::deferred_linear(input, weight, bias, slot).backward(grad);
  pp::discard_weight_gradients(slot);
  EXPECT_EQ(pp::pending_weight_gradients(slot), 0);
}

// A weight stored [in, out] and passed transposed (transformers' Conv1D): W writes its gradient in
// the stored layout.
TEST(DeferredLinear, ATransposedLeafGetsItsGradientInItsLayout) {
  torch::manual_seed(0);
  const auto input = torch::randn({3, 5, 4});
  const auto stored = torch::randn({4, 6}, torch::requires_grad());
  const auto grad = torch::randn({3, 5, 6});
  const auto s = stored.detach().clone().requires_grad_();
  torch::matmul(input, s).backward(grad);

  const int64_t slot = 434343;
  pp::deferred_linear(input, stored.t(), std::nullopt, slot).backward(grad);
  EXPECT_FALSE(stored.grad().defined());
  EXPECT_EQ(pp::run_weight_gradients(slot), 1);
  EXPECT_EQ(stored.grad().sizes(), s.grad().sizes());
  EXPECT_TRUE(torch::allclose(stored.grad(), s.grad(), 1e-5, 1e-6));
}
