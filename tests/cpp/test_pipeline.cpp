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

// Most micro-batches one rank holds at once: forwards run whose backward has not.
int64_t most_in_flight(const std::vector<pp::Action>& actions) {
  int64_t in_flight = 0, most = 0;
  for (const auto& action : actions) {
    in_flight += action.backward ? -1 : 1;
    most = std::max(most, in_flight);
  }
  return most;
}

std::string shape(pp::ScheduleKind kind, int64_t ranks, int64_t per_rank, int64_t chunks) {
  return pp::schedule_kind_name(kind) + " on " + std::to_string(ranks) + " ranks x " + std::to_string(per_rank) +
         " stages, " + std::to_string(chunks) + " micro-batches";
}

} // namespace

// Ranks 1-8, stages per rank 1-4 (1F1B: 1), micro-batches 1-32, every kind: each schedule passes
// the checker, and no rank holds more micro-batches than the documented warm-up allows.
TEST(PipelineSchedule, EveryShapeGivesAValidSchedule) {
  int64_t shapes = 0;
  for (const auto kind : {pp::ScheduleKind::GPipe, pp::ScheduleKind::OneFOneB, pp::ScheduleKind::Interleaved1F1B}) {
    for (int64_t ranks = 1; ranks <= 8; ++ranks) {
      for (int64_t per_rank = 1; per_rank <= (kind == pp::ScheduleKind::OneFOneB ? 1 : 4); ++per_rank) {
        for (int64_t chunks = 1; chunks <= 32; ++chunks) {
          SCOPED_TRACE(shape(kind, ranks, per_rank, chunks));
          std::vector<std::vector<pp::Action>> schedule;
          ASSERT_NO_THROW(schedule = pp::make_schedule(kind, ranks, per_rank, chunks));
          ASSERT_NO_THROW(pp::check_schedule(schedule, ranks * per_rank, chunks));
          const auto largest_group = chunks < 2 * ranks ? chunks : ranks + chunks % ranks;
          for (int64_t rank = 0; rank < ranks; ++rank) {
            int64_t bound = per_rank * chunks; // GPipe: every forward
            if (kind != pp::ScheduleKind::GPipe) {
              bound = per_rank == 1 ? ranks - rank : (ranks - rank - 1) * 2 + (per_rank - 1) * largest_group + 1;
            }
            EXPECT_LE(most_in_flight(schedule[rank]), std::min(bound, per_rank * chunks)) << "rank " << rank;
          }
          ++shapes;
        }
      }
    }
  }
  EXPECT_EQ(shapes, 3 * 8 * 4 * 32 - 8 * 3 * 32); // 1F1B runs only one stage per rank
}

// Megatron-Core's order when the micro-batches fill whole groups: 2 ranks, 2 stages each, 4
// micro-batches. Rank 0 warms up with (2 - 0 - 1) * 2 + (2 - 1) * 2 = 4 forwards, rank 1 with 2.
TEST(PipelineSchedule, InterleavedFollowsMegatronOrder) {
  const auto schedule = pp::make_schedule(pp::ScheduleKind::Interleaved1F1B, 2, 2, 4);
  auto F = [](int64_t s, int64_t m) { return pp::Action{false, s, m}; };
  auto B = [](int64_t s, int64_t m) { return pp::Action{true, s, m}; };
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
  auto F = [](int64_t s, int64_t m) { return pp::Action{false, s, m}; };
  auto B = [](int64_t s, int64_t m) { return pp::Action{true, s, m}; };
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
