// Pipeline schedules: which forward, backward and weight-gradient action each rank runs, in which
// order, and the check every rank runs on a schedule before any activation moves.
#include <torch_mp/pipeline.h>

#include <algorithm>
#include <optional>
#include <sstream>
#include <utility>

#include <c10/util/Exception.h>

namespace torch_mp::pipeline {
namespace {

constexpr ActionKind kF = ActionKind::Forward;
constexpr ActionKind kB = ActionKind::Backward;
constexpr ActionKind kW = ActionKind::Weight;

char letter(ActionKind kind) {
  return kind == kF ? 'F' : kind == kB ? 'B' : 'W';
}

std::string describe(const Action& action) {
  std::ostringstream out;
  out << letter(action.kind) << "(stage " << action.stage << ", micro-batch " << action.microbatch << ")";
  return out.str();
}

// Actions indexed densely: [kind][stage][micro-batch].
struct ActionTable {
  int64_t num_stages, chunks;
  std::vector<int64_t> values;
  ActionTable(int64_t num_stages, int64_t chunks, int64_t fill)
      : num_stages(num_stages), chunks(chunks), values(3 * num_stages * chunks, fill) {}
  int64_t& operator[](const Action& a) {
    return values[(static_cast<int64_t>(a.kind) * num_stages + a.stage) * chunks + a.microbatch];
  }
};

// The action whose result `action` needs from a neighbouring stage, if any: F(s, m) needs
// F(s - 1, m); B(s, m) needs B(s + 1, m), and the last stage's B(s, m) its own F(s, m). W needs
// only its own B, on its own rank.
std::optional<Action> producer_of(const Action& action, int64_t num_stages) {
  if (action.kind == kF) {
    if (action.stage == 0) {
      return std::nullopt;
    }
    return Action{kF, action.stage - 1, action.microbatch};
  }
  if (action.kind == kW) {
    return std::nullopt;
  }
  if (action.stage == num_stages - 1) {
    return Action{kF, action.stage, action.microbatch};
  }
  return Action{kB, action.stage + 1, action.microbatch};
}

void check_sizes(int64_t num_ranks, int64_t stages_per_rank, int64_t chunks) {
  TORCH_CHECK_VALUE(num_ranks >= 1, "pipeline schedule: num_ranks = ", num_ranks, "; expected >= 1");
  TORCH_CHECK_VALUE(
      stages_per_rank >= 1, "pipeline schedule: stages_per_rank = ", stages_per_rank, "; expected >= 1");
  TORCH_CHECK_VALUE(chunks >= 1, "pipeline schedule: chunks = ", chunks, "; expected >= 1 micro-batches");
}

void check_stages_per_rank(ScheduleKind kind, int64_t stages_per_rank) {
  const auto name = schedule_kind_name(kind);
  if (kind == ScheduleKind::OneFOneB || kind == ScheduleKind::ZeroBubbleH1) {
    TORCH_CHECK_VALUE(
        stages_per_rank == 1, "pipeline schedule: '", name, "' runs one stage per rank but stages_per_rank = ",
        stages_per_rank, "; expected 1, or schedule ", kind == ScheduleKind::OneFOneB ? "'interleaved_1f1b'" : "'zbv'");
  }
  if (kind == ScheduleKind::ZeroBubbleV) {
    TORCH_CHECK_VALUE(
        stages_per_rank == 2, "pipeline schedule: 'zbv' runs two stages per rank (in a V) but stages_per_rank = ",
        stages_per_rank, "; expected 2");
  }
}

// GPipe, 1F1B and interleaved 1F1B: see make_schedule in the header.
std::vector<std::vector<Action>> one_f_one_b(ScheduleKind kind, int64_t p, int64_t v, int64_t chunks) {
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
      return Action{kF, virtual_stage * p + r, m};
    };
    auto backward = [&](int64_t i) {
      const auto [virtual_stage, m] = order[i];
      return Action{kB, (v - 1 - virtual_stage) * p + r, m};
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
  return schedule;
}

// ZB-H1 (the paper's figure 3): 1F1B's F and B, each B(m) followed by W(m - r) on rank r, the W
// still missing run at the end. The r W held back are what fills rank r's share of 1F1B's bubble.
std::vector<std::vector<Action>> zero_bubble_h1(int64_t p, int64_t chunks) {
  auto schedule = one_f_one_b(ScheduleKind::OneFOneB, p, 1, chunks);
  for (int64_t r = 0; r < p; ++r) {
    std::vector<Action> actions;
    int64_t weights = 0;
    for (const auto& a : schedule[r]) {
      actions.push_back(a);
      if (a.kind == kB && a.microbatch >= r) {
        actions.push_back({kW, r, weights++});
      }
    }
    while (weights < chunks) {
      actions.push_back({kW, r, weights++});
    }
    schedule[r] = std::move(actions);
  }
  return schedule;
}

// ZB-V (the paper's section 6; torch.distributed.pipelining's ScheduleZBVZeroBubble): rank r runs
// stage r ("down", the V's first arm) and stage 2p - 1 - r ("up"), for n = max(chunks, 2p - 1)
// micro-batches, then drops those past `chunks` (dropping actions only removes waits). Warm-up:
// 2(p - r) - 1 forwards down; r pairs (F up, F down); p - r triples (F, B, W) up. Steady: F down
// (while any is left), B and W down, F, B and W up, until every forward ran. Cool-down: r pairs
// (B down, B up); p - r pairs (B down, W down); the W left, up then down.
std::vector<std::vector<Action>> zero_bubble_v(int64_t p, int64_t chunks) {
  const auto n = std::max(chunks, 2 * p - 1);
  std::vector<std::vector<Action>> schedule(p);
  for (int64_t r = 0; r < p; ++r) {
    const int64_t down = r, up = 2 * p - 1 - r;
    int64_t f_down = 0, f_up = 0, b_down = 0, b_up = 0;
    std::vector<Action> actions;
    auto run = [&](ActionKind kind, int64_t stage, int64_t& count) { actions.push_back({kind, stage, count++}); };
    for (int64_t i = 0; i < 2 * (p - r) - 1; ++i) {
      run(kF, down, f_down);
    }
    for (int64_t i = 0; i < r; ++i) {
      run(kF, up, f_up);
      run(kF, down, f_down);
    }
    for (int64_t i = 0; i < p - r; ++i) {
      run(kF, up, f_up);
      actions.push_back({kB, up, b_up});
      run(kW, up, b_up);
    }
    while (f_up < f_down || f_down < n) {
      if (f_down < n) {
        run(kF, down, f_down);
      }
      actions.push_back({kB, down, b_down});
      run(kW, down, b_down);
      run(kF, up, f_up);
      actions.push_back({kB, up, b_up});
      run(kW, up, b_up);
    }
    int64_t w_down = b_down, w_up = b_up;
    for (int64_t i = 0; i < r; ++i) {
      run(kB, down, b_down);
      run(kB, up, b_up);
    }
    for (int64_t i = 0; i < p - r; ++i) {
      run(kB, down, b_down);
      run(kW, down, w_down);
    }
    while (w_up < b_up) {
      run(kW, up, w_up);
    }
    while (w_down < b_down) {
      run(kW, down, w_down);
    }
    TORCH_CHECK(
        f_down == n && b_down == n && w_down == n && f_up == n && b_up == n && w_up == n,
        "pipeline schedule: the ZB-V construction lost actions on rank ", r);
    std::copy_if(actions.begin(), actions.end(), std::back_inserter(schedule[r]), [&](const Action& a) {
      return a.microbatch < chunks;
    });
  }
  return schedule;
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
  if (name == "zb_h1") {
    return ScheduleKind::ZeroBubbleH1;
  }
  if (name == "zbv") {
    return ScheduleKind::ZeroBubbleV;
  }
  TORCH_CHECK_VALUE(
      false, "pipeline: schedule = '", name, "'; expected 'gpipe', '1f1b', 'interleaved_1f1b', 'zb_h1' or 'zbv'");
}

std::string schedule_kind_name(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::GPipe:
      return "gpipe";
    case ScheduleKind::OneFOneB:
      return "1f1b";
    case ScheduleKind::Interleaved1F1B:
      return "interleaved_1f1b";
    case ScheduleKind::ZeroBubbleH1:
      return "zb_h1";
    case ScheduleKind::ZeroBubbleV:
      return "zbv";
  }
  TORCH_CHECK(false, "unknown schedule kind");
}

std::string to_string(const Action& action) {
  return std::to_string(action.stage) + letter(action.kind) + std::to_string(action.microbatch);
}

std::vector<int64_t> stage_ranks(ScheduleKind kind, int64_t num_ranks, int64_t stages_per_rank) {
  check_sizes(num_ranks, stages_per_rank, 1);
  check_stages_per_rank(kind, stages_per_rank);
  std::vector<int64_t> ranks(num_ranks * stages_per_rank);
  for (int64_t s = 0; s < static_cast<int64_t>(ranks.size()); ++s) {
    ranks[s] = kind == ScheduleKind::ZeroBubbleV && s >= num_ranks ? 2 * num_ranks - 1 - s : s % num_ranks;
  }
  return ranks;
}

std::vector<std::vector<Action>> make_schedule(
    ScheduleKind kind,
    int64_t num_ranks,
    int64_t stages_per_rank,
    int64_t chunks) {
  check_sizes(num_ranks, stages_per_rank, chunks);
  const auto ranks = stage_ranks(kind, num_ranks, stages_per_rank);
  std::vector<std::vector<Action>> schedule;
  switch (kind) {
    case ScheduleKind::ZeroBubbleH1:
      schedule = zero_bubble_h1(num_ranks, chunks);
      break;
    case ScheduleKind::ZeroBubbleV:
      schedule = zero_bubble_v(num_ranks, chunks);
      break;
    default:
      schedule = one_f_one_b(kind, num_ranks, stages_per_rank, chunks);
  }
  check_schedule(schedule, ranks, chunks);
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
  check_schedule(schedule, stage_ranks(ScheduleKind::Interleaved1F1B, p, num_stages / p), chunks);
}

void check_schedule(
    const std::vector<std::vector<Action>>& schedule,
    const std::vector<int64_t>& stage_ranks,
    int64_t chunks) {
  const auto p = static_cast<int64_t>(schedule.size());
  const auto num_stages = static_cast<int64_t>(stage_ranks.size());
  TORCH_CHECK_VALUE(p >= 1, "pipeline schedule: no ranks; expected one action list per rank");
  TORCH_CHECK_VALUE(num_stages >= 1, "pipeline schedule: no stages; expected the rank of each stage");
  TORCH_CHECK_VALUE(chunks >= 1, "pipeline schedule: chunks = ", chunks, "; expected >= 1 micro-batches");
  for (int64_t stage = 0; stage < num_stages; ++stage) {
    TORCH_CHECK_VALUE(
        stage_ranks[stage] >= 0 && stage_ranks[stage] < p, "pipeline schedule: stage ", stage, " lives on rank ",
        stage_ranks[stage], "; expected a rank in [0, ", p, ")");
  }

  ActionTable position(num_stages, chunks, -1);
  bool weights = false;
  for (int64_t r = 0; r < p; ++r) {
    for (size_t i = 0; i < schedule[r].size(); ++i) {
      const auto& a = schedule[r][i];
      TORCH_CHECK_VALUE(
          (a.kind == kF || a.kind == kB || a.kind == kW) && a.stage >= 0 && a.stage < num_stages &&
              a.microbatch >= 0 && a.microbatch < chunks,
          "pipeline schedule: rank ", r, " runs ", describe(a), ", outside ", num_stages, " stages and ", chunks,
          " micro-batches");
      TORCH_CHECK_VALUE(
          stage_ranks[a.stage] == r, "pipeline schedule: rank ", r, " runs ", describe(a), " but stage ", a.stage,
          " lives on rank ", stage_ranks[a.stage]);
      TORCH_CHECK_VALUE(position[a] == -1, "pipeline schedule: rank ", r, " runs ", describe(a), " twice");
      position[a] = static_cast<int64_t>(i);
      weights = weights || a.kind == kW;
    }
  }
  for (int64_t stage = 0; stage < num_stages; ++stage) {
    for (int64_t m = 0; m < chunks; ++m) {
      for (const auto kind : {kF, kB, kW}) {
        const Action a{kind, stage, m};
        TORCH_CHECK_VALUE(
            position[a] != -1 || (kind == kW && !weights), "pipeline schedule: no rank runs ", describe(a),
            "; expected rank ", stage_ranks[stage], " to run it",
            kind == kW ? " (a schedule with W runs one for every backward)" : "");
      }
      const Action forward{kF, stage, m};
      const Action backward{kB, stage, m};
      const Action weight{kW, stage, m};
      TORCH_CHECK_VALUE(
          position[backward] > position[forward], "pipeline schedule: rank ", stage_ranks[stage], " runs ",
          describe(backward), " before its forward");
      TORCH_CHECK_VALUE(
          !weights || position[weight] > position[backward], "pipeline schedule: rank ", stage_ranks[stage],
          " runs ", describe(weight), " before its backward");
    }
  }

  // Run every rank as far as it can: an action waits for its producer to have run (a receive that
  // blocks until the matching send has been posted; sends never block; W waits for nothing, its B
  // being earlier on its own rank). If no rank can move while some have actions left, the schedule
  // deadlocks.
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
      const auto producer = *producer_of(a, num_stages);
      stuck << "\n  rank " << r << " waits in " << describe(a) << " for " << describe(producer) << " on rank "
            << stage_ranks[producer.stage];
    }
  }
  TORCH_CHECK_VALUE(stuck.str().empty(), "pipeline schedule: it deadlocks:", stuck.str());
}

} // namespace torch_mp::pipeline
