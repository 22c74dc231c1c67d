// The planner's cost model: a layout's step time and peak memory per rank from a CostTable. Pure
// arithmetic; the bubble is not a formula but the pipeline's own schedule (make_schedule), replayed
// with each action's duration.
#include <torch_mp/pipeline.h>
#include <torch_mp/planner.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include <c10/util/Exception.h>

namespace torch_mp::planner {
namespace {

// ZB-H1 splits each backward into the input gradient (B) and the weight gradient (W); for the
// linear layers that dominate a block they cost about the same (Qi et al., ICLR 2024, section 2).
constexpr double kWeightShare = 0.5;
// Activations a transformer layer saves that tensor parallelism does not divide without sequence
// parallelism: 10 of 34 bytes per token and hidden unit (Korthikanti et al., 2022, table 2).
constexpr double kReplicatedActivations = 10.0 / 34.0;
// The share of a micro-batch's saved layer activations that a zero-bubble B leaves to its W (the
// linears' inputs, which the deferred weight gradients read): measured on the benchmark's Llama at
// pp 4, ZB-H1 held a third of a block's saved bytes per pending W more than 1F1B (0.9 MiB on its
// third rank, 2.9 on its last with the head's output gradients).
constexpr double kWeightHeld = 1.0 / 3.0;
// A backward that adds to existing gradients computes each weight's gradient before adding it to
// .grad (autograd's AccumulateGrad; a zero-bubble W likewise): the share of a stage's largest layer
// (or its embedding, or its head) whose gradients are in flight at once, measured on the test's
// Llama (2.25 MiB above the activations in a second backward, a block of 3.75 MiB).
constexpr double kAccumulated = 0.5;

bool zero_bubble(const std::string& schedule) {
  return schedule == "zb_h1" || schedule == "zbv";
}

// [first, last) layer index of each stage.
std::vector<std::pair<int64_t, int64_t>> stage_layers(const std::vector<int64_t>& balance) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  int64_t start = 0;
  for (const auto count : balance) {
    ranges.emplace_back(start, start + count);
    start += count;
  }
  return ranges;
}

void check_layout(const CostTable& costs, const Layout& layout) {
  int64_t layers = 0;
  for (const auto count : layout.balance) {
    TORCH_CHECK_VALUE(count >= 0, "planner: layout.balance has an entry ", count, "; expected counts >= 0");
    layers += count;
  }
  TORCH_CHECK_VALUE(
      layers == static_cast<int64_t>(costs.layers.size()), "planner: layout.balance adds up to ", layers,
      " layers; expected the cost table's ", costs.layers.size());
  TORCH_CHECK_VALUE(
      layout.pp >= 1 && layout.tp >= 1 && layout.dp >= 1 && layout.chunks >= 1 && layout.batch >= 1,
      "planner: layout pp ", layout.pp, ", tp ", layout.tp, ", dp ", layout.dp, ", chunks ", layout.chunks,
      ", batch ", layout.batch, "; expected each >= 1");
  TORCH_CHECK_VALUE(
      !layout.balance.empty() && layout.balance.size() % layout.pp == 0, "planner: layout.balance has ",
      layout.balance.size(), " stages; expected a multiple of pp = ", layout.pp);
  // "except_last" (a pipeline's, as memory_report passes it) is costed as "never": an upper bound.
  TORCH_CHECK_VALUE(
      layout.checkpoint == "never" || layout.checkpoint == "always" || layout.checkpoint == "except_last",
      "planner: layout.checkpoint = '", layout.checkpoint, "'; expected 'never', 'except_last' or 'always'");
}

// Bytes one micro-batch of `rows` leaves saved in a stage's layers.
double activations(const CostTable& costs, std::pair<int64_t, int64_t> layers, double rows, const Layout& layout) {
  int64_t sum = 0;
  for (auto i = layers.first; i < layers.second; ++i) {
    sum += costs.activation_bytes[i];
  }
  const double saved = static_cast<double>(sum) * rows;
  if (layout.tp == 1) {
    return saved;
  }
  if (layout.sequence_parallel) {
    return saved / static_cast<double>(layout.tp);
  }
  return saved * (kReplicatedActivations + (1 - kReplicatedActivations) / static_cast<double>(layout.tp));
}

double params(const CostTable& costs, std::pair<int64_t, int64_t> layers, bool first, bool last, int64_t tp) {
  int64_t total = 0;
  int64_t sharded = 0;
  for (auto i = layers.first; i < layers.second; ++i) {
    total += costs.param_bytes[i];
    sharded += costs.sharded_param_bytes[i];
  }
  if (first) {
    total += costs.first_param_bytes;
    sharded += costs.first_sharded_bytes;
  }
  if (last) {
    total += costs.last_param_bytes;
    sharded += costs.last_sharded_bytes;
  }
  if (last && !first) {  // a pipeline's last stage holds its own copy of a tied head
    total += costs.tied_param_bytes;
    sharded += costs.tied_sharded_bytes;
  }
  return static_cast<double>(total - sharded) + static_cast<double>(sharded) / static_cast<double>(tp);
}

std::vector<std::vector<pipeline::Action>> schedule_of(const Layout& layout) {
  return pipeline::make_schedule(
      pipeline::parse_schedule_kind(layout.schedule), layout.pp, layout.stages_per_rank(), layout.chunks);
}

// Each pipeline rank's actions in order: the schedule's (make_schedule); without a pipeline, each
// micro-batch's forward then its backward.
std::vector<std::vector<pipeline::Action>> actions_of(const Layout& layout) {
  if (layout.pp == 1) {
    std::vector<pipeline::Action> actions;
    for (int64_t m = 0; m < layout.chunks; ++m) {
      actions.push_back({pipeline::ActionKind::Forward, 0, m});
      actions.push_back({pipeline::ActionKind::Backward, 0, m});
    }
    return {actions};
  }
  return schedule_of(layout);
}

} // namespace

Line Line::through(double one_row, int64_t rows, double at_rows) {
  if (rows <= 1) {
    return {0.0, at_rows};
  }
  const double per_row = std::max(0.0, (at_rows - one_row) / static_cast<double>(rows - 1));
  return {std::max(0.0, one_row - per_row), per_row};
}

Link CostTable::link(const std::string& dim) const {
  const std::optional<Link>* own = dim == "tp" ? &tp_link : dim == "dp" ? &dp_link : dim == "pp" ? &pp_link : nullptr;
  TORCH_CHECK_VALUE(own != nullptr, "planner: mesh dim '", dim, "'; expected 'tp', 'dp' or 'pp'");
  return own->has_value() ? **own : Link{alpha_s, beta_s_per_byte};
}

double CostTable::all_reduce_s(double nbytes, int64_t ranks, const std::string& dim) const {
  const auto [alpha, beta] = link(dim);
  const auto steps = 2 * static_cast<double>(ranks - 1); // a ring's reduce-scatter and all-gather
  return ranks <= 1 ? 0.0 : steps * (alpha + beta * nbytes / static_cast<double>(ranks));
}

double CostTable::send_s(double nbytes) const {
  const auto [alpha, beta] = link("pp");
  return alpha + beta * nbytes;
}

void CostTable::check() const {
  const auto n = layers.size();
  const std::pair<const char*, size_t> lengths[] = {
      {"forward", forward.size()}, {"backward", backward.size()}, {"param_bytes", param_bytes.size()},
      {"sharded_param_bytes", sharded_param_bytes.size()}, {"activation_bytes", activation_bytes.size()}};
  TORCH_CHECK_VALUE(n >= 1, "planner: costs.layers is empty; expected at least one layer");
  for (const auto& [name, length] : lengths) {
    TORCH_CHECK_VALUE(length == n, "planner: costs.", name, " has ", length, " entries; expected one per layer (",
                      n, ")");
  }
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(
        param_bytes[i] >= 0 && activation_bytes[i] >= 0 && sharded_param_bytes[i] >= 0 &&
            sharded_param_bytes[i] <= param_bytes[i],
        "planner: costs of layer ", layers[i], ": param_bytes ", param_bytes[i], ", sharded_param_bytes ",
        sharded_param_bytes[i], ", activation_bytes ", activation_bytes[i],
        "; expected sizes >= 0, the sharded part at most the parameters");
  }
  TORCH_CHECK_VALUE(
      first_sharded_bytes >= 0 && first_sharded_bytes <= first_param_bytes && last_sharded_bytes >= 0 &&
          last_sharded_bytes <= last_param_bytes && tied_sharded_bytes >= 0 && tied_sharded_bytes <= tied_param_bytes &&
          tied_param_bytes <= first_param_bytes && outside_activation_bytes >= 0 && boundary_bytes >= 0 &&
          output_bytes >= 0,
      "planner: costs outside the layers: first_param_bytes ", first_param_bytes, " (sharded ", first_sharded_bytes,
      "), last_param_bytes ", last_param_bytes, " (sharded ", last_sharded_bytes, "), tied_param_bytes ",
      tied_param_bytes, " (sharded ", tied_sharded_bytes, "), outside_activation_bytes ",
      outside_activation_bytes, ", boundary_bytes ", boundary_bytes, ", output_bytes ", output_bytes,
      "; expected sizes >= 0, the sharded parts at most the parameters, the tied ones within the first stage's");
  TORCH_CHECK_VALUE(param_element_size >= 1, "planner: costs.param_element_size = ", param_element_size,
                    "; expected >= 1");
  TORCH_CHECK_VALUE(host_cores >= 0.0 && host_ranks >= 1, "planner: costs.host_cores = ", host_cores,
                    ", host_ranks = ", host_ranks, "; expected host_cores >= 0 (0: a device per rank), host_ranks >= 1");
}

std::vector<double> CostTable::speedup(int64_t pp) const {
  if (host_cores <= 0.0) {
    return {};
  }
  const auto rate = [&](double busy) { return std::min(1.0, host_cores / busy); };
  std::vector<double> out;
  for (int64_t busy = 1; busy <= pp; ++busy) {
    out.push_back(rate(static_cast<double>(host_ranks * busy) / static_cast<double>(pp)) /
                  rate(static_cast<double>(host_ranks)));
  }
  return out;
}

double Layout::rows() const {
  return static_cast<double>(batch) / static_cast<double>(dp) / static_cast<double>(chunks);
}

int64_t Layout::stages_per_rank() const {
  return static_cast<int64_t>(balance.size()) / pp;
}

std::vector<int64_t> Layout::stage_ranks() const {
  if (stages_per_rank() > 1) {
    return pipeline::stage_ranks(pipeline::parse_schedule_kind(schedule), pp, stages_per_rank());
  }
  std::vector<int64_t> ranks(pp);
  for (int64_t r = 0; r < pp; ++r) {
    ranks[r] = r;
  }
  return ranks;
}

std::vector<StagePeak> stage_peaks(const CostTable& costs, const Layout& layout) {
  costs.check();
  check_layout(costs, layout);
  const double rows = layout.rows();
  const auto ranges = stage_layers(layout.balance);
  const auto stages = static_cast<int64_t>(ranges.size());
  const auto last = stages - 1;
  const bool always = layout.checkpoint == "always";
  std::vector<double> params_of(stages);
  // fully_shard: what FSDP2 shards (all but a tied head, whole on both ends), stored 1/dp per rank
  // and held all-gathered through the step.
  std::vector<double> gathered(stages, 0.0);
  std::vector<double> stored(stages);
  const double tied = static_cast<double>(costs.tied_param_bytes - costs.tied_sharded_bytes) +
      static_cast<double>(costs.tied_sharded_bytes) / static_cast<double>(layout.tp);
  std::vector<double> one(stages);
  std::vector<double> kept(stages);
  std::vector<double> pending(stages);
  std::vector<double> finished(stages);
  std::vector<double> widest(stages);
  for (int64_t s = 0; s < stages; ++s) {
    params_of[s] = params(costs, ranges[s], s == 0, s == last, layout.tp);
    if (layout.fully_shard) {
      gathered[s] = params_of[s] - (s == 0 || s == last ? tied : 0.0);
    }
    stored[s] = params_of[s] - gathered[s] + gathered[s] / static_cast<double>(layout.dp);
    const double part = activations(costs, ranges[s], rows, layout);
    one[s] = part + (s == last ? static_cast<double>(costs.outside_activation_bytes) * rows : 0.0);
    kept[s] = always ? static_cast<double>(costs.boundary_bytes) * rows : one[s];
    // A recomputed stage's linears run outside the stage's forward: their B computes the weight
    // gradients, and W keeps nothing.
    pending[s] = always ? 0.0
                        : kWeightHeld * part + (s == last ? static_cast<double>(costs.output_bytes) * rows : 0.0);
    finished[s] = s > 0 ? rows * static_cast<double>(costs.boundary_bytes) : 0.0;
    widest[s] = params(costs, {0, 0}, s == 0, s == last, layout.tp);
    for (auto i = ranges[s].first; i < ranges[s].second; ++i) {
      widest[s] = std::max(widest[s], params(costs, {i, i + 1}, false, false, layout.tp));
    }
  }
  const int64_t zero_bubble_held = zero_bubble(layout.schedule) && layout.pp > 1 ? 1 : 0;
  const auto stage_ranks = layout.stage_ranks();
  std::vector<StagePeak> peaks(stages);
  const auto schedule = actions_of(layout);
  for (int64_t rank = 0; rank < static_cast<int64_t>(schedule.size()); ++rank) {
    std::vector<int64_t> mine;
    for (int64_t s = 0; s < stages; ++s) {
      if (stage_ranks[s] == rank) {
        mine.push_back(s);
      }
    }
    // Per stage of the rank: micro-batches forwarded and not yet backward, B done with W pending,
    // B done; whether its gradients exist.
    std::vector<int64_t> forwarded(stages, 0);
    std::vector<int64_t> waiting(stages, 0);
    std::vector<int64_t> done(stages, 0);
    std::vector<bool> graded(stages, false);
    // {stage: (gradient bytes, activation bytes)} at the start of the action, for the rank's stages.
    std::vector<std::pair<double, double>> best;
    std::vector<std::pair<double, double>> now(stages);
    double best_total = -std::numeric_limits<double>::infinity();
    for (const auto& action : schedule[rank]) {
      const bool backward = action.kind == pipeline::ActionKind::Backward;
      double total = 0.0;
      for (const auto s : mine) {
        double held = static_cast<double>(forwarded[s]) * kept[s] + static_cast<double>(waiting[s]) * pending[s] +
            static_cast<double>(done[s]) * finished[s];
        if (backward && s == action.stage) {
          held += (s == last ? static_cast<double>(2 * costs.output_bytes) * rows : 0.0) + (always ? one[s] : 0.0);
        }
        if (s == action.stage && graded[s] && action.kind != pipeline::ActionKind::Forward) {
          held += kAccumulated * widest[s];
        }
        now[s] = {graded[s] ? params_of[s] : 0.0, held};
        total += now[s].first + now[s].second;
      }
      if (total > best_total) {
        best = now;
        best_total = total;
      }
      if (action.kind == pipeline::ActionKind::Forward) {
        ++forwarded[action.stage];
      } else if (backward) {
        --forwarded[action.stage];
        ++done[action.stage];
        waiting[action.stage] += zero_bubble_held;
        graded[action.stage] = true;
      } else {
        --waiting[action.stage];
      }
    }
    // The step's end: every gradient of the rank's stages made (the last backward makes them while
    // it frees the activations: with one micro-batch, more than were held at its start), and what
    // is kept of every finished micro-batch. Under fully_shard the last backward reshards.
    if (!layout.fully_shard) {
      auto end = now;
      double end_total = 0.0;
      for (const auto s : mine) {
        end[s] = {params_of[s], static_cast<double>(layout.chunks) * finished[s]};
        end_total += end[s].first + end[s].second;
      }
      if (end_total > best_total) {
        best = end;
        best_total = end_total;
      }
    }
    // With data parallelism, the all-reduce after the backwards: every gradient of the rank, the
    // flattened copy it reduces in place, and what is kept of every finished micro-batch. Under
    // fully_shard only what FSDP2 does not shard is all-reduced (its own gradients were
    // reduce-scattered, its parameters resharded in the last backward).
    double during = best_total;
    double after = 0.0;
    for (const auto s : mine) {
      during += stored[s] + gathered[s];
      after += stored[s] + (layout.fully_shard ? stored[s] : params_of[s]) + (params_of[s] - gathered[s]) +
          static_cast<double>(layout.chunks) * finished[s];
    }
    const bool flat = layout.dp > 1 && after > during;
    for (const auto s : mine) {
      const auto optimizer = static_cast<int64_t>(stored[s] / static_cast<double>(costs.param_element_size) * 8);
      peaks[s] = flat ? StagePeak{static_cast<int64_t>(stored[s]),
                                  static_cast<int64_t>(layout.fully_shard ? stored[s] : params_of[s]), optimizer,
                                  static_cast<int64_t>(params_of[s] - gathered[s]),
                                  static_cast<int64_t>(static_cast<double>(layout.chunks) * finished[s])}
                      : StagePeak{static_cast<int64_t>(stored[s] + gathered[s]), static_cast<int64_t>(best[s].first),
                                  optimizer, 0, static_cast<int64_t>(best[s].second)};
    }
  }
  return peaks;
}

std::vector<int64_t> peak_bytes(const CostTable& costs, const Layout& layout) {
  const auto peaks = stage_peaks(costs, layout);
  const auto ranks = layout.stage_ranks();
  std::vector<int64_t> totals(layout.pp, 0);
  for (size_t stage = 0; stage < peaks.size(); ++stage) {
    totals[ranks[stage]] += peaks[stage].total();
  }
  return totals;
}

StageTimes stage_times(const CostTable& costs, const Layout& layout) {
  costs.check();
  check_layout(costs, layout);
  const double rows = layout.rows();
  const auto tp = static_cast<double>(layout.tp);
  const auto ranges = stage_layers(layout.balance);
  StageTimes times;
  for (size_t stage = 0; stage < ranges.size(); ++stage) {
    const auto [begin, end] = ranges[stage];
    double forward = 0.0;
    double backward = 0.0;
    for (auto i = begin; i < end; ++i) {
      forward += costs.forward[i].at(rows);
    }
    for (auto i = begin; i < end; ++i) {
      backward += costs.backward[i].at(rows);
    }
    forward /= tp;
    backward /= tp;
    const double collectives = static_cast<double>((end - begin) * costs.all_reduces_per_layer) *
        costs.all_reduce_s(static_cast<double>(costs.boundary_bytes) * rows, layout.tp, "tp");
    forward += collectives;
    backward += collectives;
    if (stage == ranges.size() - 1) {
      forward += costs.outside_forward.at(rows) / tp;
      backward += costs.outside_backward.at(rows) / tp;
    }
    if (layout.checkpoint == "always") {
      backward += forward;
    }
    const double weight = zero_bubble(layout.schedule) ? backward * kWeightShare : 0.0;
    times.forward.push_back(forward);
    times.backward.push_back(backward - weight);
    times.weight.push_back(weight);
  }
  return times;
}

double simulate(
    const std::string& schedule,
    int64_t ranks,
    int64_t chunks,
    const StageTimes& durations,
    double send_s,
    const std::vector<double>& speedup) {
  const auto stages = static_cast<int64_t>(durations.forward.size());
  TORCH_CHECK_VALUE(
      ranks >= 1 && stages >= ranks && stages % ranks == 0 && durations.backward.size() == durations.forward.size() &&
          durations.weight.size() == durations.forward.size(),
      "planner: simulate of ", stages, " stages on ", ranks, " ranks (backward ", durations.backward.size(),
      ", weight ", durations.weight.size(), " entries); expected forward, backward and weight of one length, a ",
      "multiple of ranks");
  TORCH_CHECK_VALUE(
      speedup.empty() ||
          (static_cast<int64_t>(speedup.size()) == ranks &&
           std::all_of(speedup.begin(), speedup.end(), [](double x) { return x > 0.0; })),
      "planner: simulate's speedup has ", speedup.size(), " entries; expected none or one > 0 per busy rank count (",
      ranks, ")");
  const auto per_rank = stages / ranks;
  const auto kind = pipeline::parse_schedule_kind(schedule);
  const auto actions = pipeline::make_schedule(kind, ranks, per_rank, chunks);
  std::vector<int64_t> rank_of(stages);
  if (per_rank > 1) {
    rank_of = pipeline::stage_ranks(kind, ranks, per_rank);
  } else {
    for (int64_t s = 0; s < stages; ++s) {
      rank_of[s] = s;
    }
  }
  const std::vector<double>* duration[] = {&durations.forward, &durations.backward, &durations.weight};
  // ended[(kind * stages + stage) * chunks + microbatch]; < 0: not yet.
  std::vector<double> ended(3 * stages * chunks, -1.0);
  const auto slot = [&](int64_t k, int64_t stage, int64_t microbatch) {
    return (k * stages + stage) * chunks + microbatch;
  };
  // When the input of `action` arrives (its producer's end, plus a send between ranks); < 0: its
  // producer has not ended.
  const auto ready_at = [&](const pipeline::Action& action) {
    const auto k = static_cast<int64_t>(action.kind);
    const auto stage = action.stage;
    if (k == 0 && stage == 0) {
      return 0.0;
    }
    // The producer (kind, stage), same micro-batch.
    const auto [kind_of, from] = k == 0 ? std::pair<int64_t, int64_t>{0, stage - 1}
        : k == 2                        ? std::pair<int64_t, int64_t>{1, stage}
        : stage < stages - 1            ? std::pair<int64_t, int64_t>{1, stage + 1}
                                        : std::pair<int64_t, int64_t>{0, stage};
    const double done = ended[slot(kind_of, from, action.microbatch)];
    return done < 0 ? -1.0 : done + (rank_of[from] != rank_of[stage] ? send_s : 0.0);
  };
  // Event by event: each rank runs its actions in order; a running action's remaining seconds (at
  // the table's speed) shrink at speedup[busy ranks - 1] per second.
  std::vector<size_t> position(ranks, 0);
  std::vector<double> left(ranks, -1.0); // < 0: idle
  size_t remaining = 0;
  for (const auto& a : actions) {
    remaining += a.size();
  }
  double now = 0.0;
  while (remaining) {
    double next_ready = std::numeric_limits<double>::infinity();
    int64_t busy = 0;
    for (int64_t rank = 0; rank < ranks; ++rank) {
      if (left[rank] < 0 && position[rank] < actions[rank].size()) {
        const auto& action = actions[rank][position[rank]];
        const double ready = ready_at(action);
        if (ready >= 0 && ready <= now) {
          left[rank] = (*duration[static_cast<int64_t>(action.kind)])[action.stage];
        } else if (ready >= 0) {
          next_ready = std::min(next_ready, ready);
        }
      }
      busy += left[rank] >= 0;
    }
    if (!busy) {
      TORCH_CHECK(std::isfinite(next_ready), "planner: the ", schedule, " schedule on ", ranks, " ranks with ",
                  chunks, " micro-batches does not progress in the simulation (a schedule check_schedule should have ",
                  "refused)");
      now = next_ready;
      continue;
    }
    const double speed = speedup.empty() ? 1.0 : speedup[busy - 1];
    double first_end = std::numeric_limits<double>::infinity();
    for (int64_t rank = 0; rank < ranks; ++rank) {
      if (left[rank] >= 0) {
        first_end = std::min(first_end, left[rank]);
      }
    }
    if (now + first_end / speed > next_ready) { // an input arrives first: advance to it
      const double work = (next_ready - now) * speed;
      for (auto& l : left) {
        l = l >= 0 ? std::max(0.0, l - work) : l;
      }
      now = next_ready;
      continue;
    }
    now += first_end / speed;
    for (int64_t rank = 0; rank < ranks; ++rank) {
      if (left[rank] < 0) {
        continue;
      }
      if (left[rank] == first_end) {
        const auto& action = actions[rank][position[rank]];
        ended[slot(static_cast<int64_t>(action.kind), action.stage, action.microbatch)] = now;
        left[rank] = -1.0;
        ++position[rank];
        --remaining;
      } else {
        left[rank] -= first_end;
      }
    }
  }
  return now; // the last action's end
}

double step_seconds(const CostTable& costs, const Layout& layout) {
  const auto times = stage_times(costs, layout);
  const double rows = layout.rows();
  const double send = layout.pp > 1
      ? costs.send_s(static_cast<double>(costs.boundary_bytes) * rows /
                     static_cast<double>(layout.sequence_parallel ? layout.tp : 1))
      : 0.0;
  double compute = 0.0;
  if (layout.pp == 1) {
    compute = static_cast<double>(layout.chunks) * (times.forward[0] + times.backward[0] + times.weight[0]);
  } else {
    compute = simulate(layout.schedule, layout.pp, layout.chunks, times, send, costs.speedup(layout.pp));
  }
  const auto ranges = stage_layers(layout.balance);
  const auto ranks = layout.stage_ranks();
  std::vector<double> held(layout.pp, 0.0);
  for (size_t stage = 0; stage < ranges.size(); ++stage) {
    held[ranks[stage]] += params(costs, ranges[stage], stage == 0, stage == ranges.size() - 1, layout.tp);
  }
  const double gradients = *std::max_element(held.begin(), held.end());
  return compute + costs.all_reduce_s(gradients, layout.dp, "dp");
}

} // namespace torch_mp::planner
