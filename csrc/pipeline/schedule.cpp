// Pipeline schedules: which forward and backward each rank runs, in which order, and the check
// every rank runs on a schedule before any activation moves.
#include <torch_mp/pipeline.h>

#include <algorithm>
#include <optional>
#include <sstream>
#include <utility>

#include <c10/util/Exception.h>

namespace torch_mp::pipeline {
namespace {

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
  const auto total = v * chunks; // forwards (and backwards) on each rank

  // Micro-batch groups: `p` micro-batches each, the remainder joining the last group (all of them
  // in one group when chunks < 2p). Each rank runs a group's forwards stage by stage (its first
  // stage for every micro-batch of the group, then its second, ...) and its backwards likewise,
  // its stages taken in reverse.
  const auto num_groups = std::max<int64_t>(1, chunks / p);
  const auto largest_group = chunks - (num_groups - 1) * p;
  std::vector<std::pair<int64_t, int64_t>> order; // (virtual stage, micro-batch)
  for (int64_t group = 0; group < num_groups; ++group) {
    const auto first = group * p;
    const auto last = group + 1 == num_groups ? chunks : first + p;
    for (int64_t virtual_stage = 0; virtual_stage < v; ++virtual_stage) {
      for (int64_t m = first; m < last; ++m) {
        order.emplace_back(virtual_stage, m);
      }
    }
  }

  std::vector<std::vector<Action>> schedule(p);
  for (int64_t r = 0; r < p; ++r) {
    // Forwards before the first backward. GPipe: all of them. 1F1B: one per later stage, whose
    // first gradient comes back while this rank runs one more forward. Interleaved: Megatron-Core's
    // (p - r - 1) * 2 + (v - 1) * group, with the largest group.
    int64_t warm_up = total;
    if (kind != ScheduleKind::GPipe) {
      warm_up = v == 1 ? p - r - 1 : (p - r - 1) * 2 + (v - 1) * largest_group;
    }
    warm_up = std::min(warm_up, total);
    auto forward = [&](int64_t i) {
      const auto [virtual_stage, m] = order[i];
      return Action{false, virtual_stage * p + r, m};
    };
    auto backward = [&](int64_t i) {
      const auto [virtual_stage, m] = order[i];
      return Action{true, (v - 1 - virtual_stage) * p + r, m};
    };
    auto& actions = schedule[r];
    for (int64_t i = 0; i < warm_up; ++i) {
      actions.push_back(forward(i));
    }
    for (int64_t i = 0; i < total - warm_up; ++i) {
      actions.push_back(forward(warm_up + i));
      actions.push_back(backward(i));
    }
    for (int64_t i = total - warm_up; i < total; ++i) {
      actions.push_back(backward(i));
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
