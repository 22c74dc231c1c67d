// Pipeline schedules: which forward and backward each rank runs, in which order, and the check
// every rank runs on a schedule before any activation moves.
#include <torch_mp/pipeline.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <sstream>
#include <tuple>

#include <c10/util/Exception.h>

namespace torch_mp::pipeline {
namespace {

constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
// Simulated costs: a backward computes two matmuls for each of the forward's one.
constexpr int64_t kForwardCost = 1;
constexpr int64_t kBackwardCost = 2;

std::string describe(const Action& action) {
  std::ostringstream out;
  out << (action.backward ? "B" : "F") << "(stage " << action.stage << ", micro-batch "
      << action.microbatch << ")";
  return out.str();
}

// Actions indexed densely: [backward][stage][micro-batch].
struct ActionTable {
  int64_t num_stages, chunks;
  std::vector<int64_t> values;
  ActionTable(int64_t num_stages, int64_t chunks, int64_t fill)
      : num_stages(num_stages), chunks(chunks), values(2 * num_stages * chunks, fill) {}
  int64_t& operator[](const Action& a) {
    return values[((a.backward ? 1 : 0) * num_stages + a.stage) * chunks + a.microbatch];
  }
};

// The action whose result `action` needs from a neighbouring stage, if any: F(s, m) needs
// F(s - 1, m); B(s, m) needs B(s + 1, m), and the last stage's B(s, m) its own F(s, m).
std::optional<Action> producer_of(const Action& action, int64_t num_stages) {
  if (!action.backward) {
    if (action.stage == 0) {
      return std::nullopt;
    }
    return Action{false, action.stage - 1, action.microbatch};
  }
  if (action.stage == num_stages - 1) {
    return Action{false, action.stage, action.microbatch};
  }
  return Action{true, action.stage + 1, action.microbatch};
}

void check_sizes(int64_t num_ranks, int64_t stages_per_rank, int64_t chunks) {
  TORCH_CHECK_VALUE(num_ranks >= 1, "pipeline schedule: num_ranks = ", num_ranks, "; expected >= 1");
  TORCH_CHECK_VALUE(
      stages_per_rank >= 1, "pipeline schedule: stages_per_rank = ", stages_per_rank, "; expected >= 1");
  TORCH_CHECK_VALUE(chunks >= 1, "pipeline schedule: chunks = ", chunks, "; expected >= 1 micro-batches");
}

} // namespace

ScheduleKind parse_schedule_kind(const std::string& name) {
  if (name == "gpipe") {
    return ScheduleKind::GPipe;
  }
  if (name == "1f1b") {
    return ScheduleKind::OneFOneB;
  }
  if (name == "interleaved_1f1b") {
    return ScheduleKind::Interleaved1F1B;
  }
  TORCH_CHECK_VALUE(
      false, "pipeline: schedule = '", name, "'; expected 'gpipe', '1f1b' or 'interleaved_1f1b'");
}

std::string schedule_kind_name(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::GPipe:
      return "gpipe";
    case ScheduleKind::OneFOneB:
      return "1f1b";
    case ScheduleKind::Interleaved1F1B:
      return "interleaved_1f1b";
  }
  TORCH_CHECK(false, "unknown schedule kind");
}

std::vector<std::vector<Action>> make_schedule(
    ScheduleKind kind,
    int64_t num_ranks,
    int64_t stages_per_rank,
    int64_t chunks) {
  check_sizes(num_ranks, stages_per_rank, chunks);
  TORCH_CHECK_VALUE(
      kind != ScheduleKind::OneFOneB || stages_per_rank == 1,
      "pipeline schedule: '1f1b' runs one stage per rank but stages_per_rank = ", stages_per_rank,
      "; expected 1, or schedule 'interleaved_1f1b'");
  const auto p = num_ranks;
  const auto v = stages_per_rank;
  const auto num_stages = p * v;

  // Micro-batches in flight (forward done, backward not yet) that each rank may hold. 1F1B: stage s
  // warms up with (stages - s - 1) forwards; interleaved: Megatron-LM's warm-up for rank r.
  std::vector<int64_t> limit(p, kNever);
  for (int64_t r = 0; r < p; ++r) {
    if (kind == ScheduleKind::GPipe) {
      continue;
    }
    limit[r] = v == 1 ? num_stages - r : (p - r - 1) * 2 + (v - 1) * p + 1;
  }
  // Forwards go micro-batch group by group (groups of p), virtual stage by virtual stage inside a
  // group; backwards the same way with the virtual stages reversed.
  auto order = [&](const Action& a) {
    const auto virtual_stage = a.stage / p;
    return std::make_tuple(a.microbatch / p, a.backward ? -virtual_stage : virtual_stage, a.microbatch % p);
  };

  ActionTable finish(num_stages, chunks, kNever);
  std::vector<std::vector<Action>> schedule(p);
  std::vector<int64_t> busy_until(p, 0), in_flight(p, 0), forwards_left(p, v * chunks);
  int64_t remaining = 2 * num_stages * chunks;
  const int64_t horizon = (kForwardCost + kBackwardCost) * num_stages * chunks * 2 + 16;
  for (int64_t t = 0; remaining > 0; ++t) {
    TORCH_CHECK(t < horizon, "pipeline schedule: the simulation made no progress (internal error)");
    for (int64_t r = 0; r < p; ++r) {
      if (busy_until[r] > t) {
        continue;
      }
      std::optional<Action> best_forward, best_backward;
      for (int64_t stage = r; stage < num_stages; stage += p) {
        for (int64_t m = 0; m < chunks; ++m) {
          for (const bool backward : {false, true}) {
            const Action a{backward, stage, m};
            if (finish[a] != kNever) {
              continue;
            }
            const auto producer = producer_of(a, num_stages);
            if (producer && finish[*producer] > t) {
              continue;
            }
            auto& best = backward ? best_backward : best_forward;
            if (!best || order(a) < order(*best)) {
              best = a;
            }
          }
        }
      }
      std::optional<Action> pick;
      if (kind == ScheduleKind::GPipe) {
        pick = best_forward ? best_forward : (forwards_left[r] == 0 ? best_backward : std::nullopt);
      } else {
        pick = best_backward ? best_backward : (in_flight[r] < limit[r] ? best_forward : std::nullopt);
      }
      if (!pick) {
        continue;
      }
      busy_until[r] = t + (pick->backward ? kBackwardCost : kForwardCost);
      finish[*pick] = busy_until[r];
      in_flight[r] += pick->backward ? -1 : 1;
      forwards_left[r] -= pick->backward ? 0 : 1;
      schedule[r].push_back(*pick);
      --remaining;
    }
  }
  check_schedule(schedule, num_stages, chunks);
  return schedule;
}

void check_schedule(
    const std::vector<std::vector<Action>>& schedule,
    int64_t num_stages,
    int64_t chunks) {
  const auto p = static_cast<int64_t>(schedule.size());
  TORCH_CHECK_VALUE(p >= 1, "pipeline schedule: no ranks; expected one action list per rank");
  TORCH_CHECK_VALUE(
      num_stages >= p && num_stages % p == 0, "pipeline schedule: ", num_stages, " stages on ", p,
      " ranks; expected a multiple of the rank count (stage s lives on rank s % ranks)");
  check_sizes(p, num_stages / p, chunks);

  ActionTable position(num_stages, chunks, -1);
  for (int64_t r = 0; r < p; ++r) {
    for (size_t i = 0; i < schedule[r].size(); ++i) {
      const auto& a = schedule[r][i];
      TORCH_CHECK_VALUE(
          a.stage >= 0 && a.stage < num_stages && a.microbatch >= 0 && a.microbatch < chunks,
          "pipeline schedule: rank ", r, " runs ", describe(a), ", outside ", num_stages, " stages and ",
          chunks, " micro-batches");
      TORCH_CHECK_VALUE(
          a.stage % p == r, "pipeline schedule: rank ", r, " runs ", describe(a), " but stage ", a.stage,
          " lives on rank ", a.stage % p);
      TORCH_CHECK_VALUE(position[a] == -1, "pipeline schedule: rank ", r, " runs ", describe(a), " twice");
      position[a] = static_cast<int64_t>(i);
    }
  }
  for (int64_t stage = 0; stage < num_stages; ++stage) {
    for (int64_t m = 0; m < chunks; ++m) {
      for (const bool backward : {false, true}) {
        const Action a{backward, stage, m};
        TORCH_CHECK_VALUE(
            position[a] != -1, "pipeline schedule: no rank runs ", describe(a), "; expected rank ",
            stage % p, " to run it");
      }
      const Action forward{false, stage, m};
      const Action backward{true, stage, m};
      TORCH_CHECK_VALUE(
          position[backward] > position[forward], "pipeline schedule: rank ", stage % p, " runs ",
          describe(backward), " before its forward");
    }
  }

  // Run every rank as far as it can: an action waits for its producer to have run (a receive that
  // blocks until the matching send has been posted; sends never block). If no rank can move while
  // some have actions left, the schedule deadlocks.
  ActionTable done(num_stages, chunks, 0);
  std::vector<size_t> next(p, 0);
  for (bool moved = true; moved;) {
    moved = false;
    for (int64_t r = 0; r < p; ++r) {
      while (next[r] < schedule[r].size()) {
        const auto& a = schedule[r][next[r]];
        const auto producer = producer_of(a, num_stages);
        if (producer && !done[*producer]) {
          break;
        }
        done[a] = 1;
        ++next[r];
        moved = true;
      }
    }
  }
  std::ostringstream stuck;
  for (int64_t r = 0; r < p; ++r) {
    if (next[r] < schedule[r].size()) {
      const auto& a = schedule[r][next[r]];
      stuck << "\n  rank " << r << " waits in " << describe(a) << " for " << describe(*producer_of(a, num_stages))
            << " on rank " << producer_of(a, num_stages)->stage % p;
    }
  }
  TORCH_CHECK_VALUE(stuck.str().empty(), "pipeline schedule: it deadlocks:", stuck.str());
}

} // namespace torch_mp::pipeline
