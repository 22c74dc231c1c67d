// The planner's search: every layout of the world's ranks, costed (model.cpp), the fastest that fits
// chosen, the others ranked with the reason each was not.
#include <torch_mp/planner.h>
#include <torch_mp/split.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>
#include <tuple>

#include <c10/util/Exception.h>

namespace torch_mp::planner {
namespace {

std::vector<int64_t> divisors(int64_t n) {
  std::vector<int64_t> found;
  for (int64_t d = 1; d <= n; ++d) {
    if (n % d == 0) {
      found.push_back(d);
    }
  }
  return found;
}

// printf into a std::string (the plans' numbers, formatted as Python's f-strings do).
template <typename... Args>
std::string format(const char* pattern, Args... args) {
  char buffer[256];
  std::snprintf(buffer, sizeof(buffer), pattern, args...);
  return buffer;
}

// Step time to the nanosecond, peak, then the layout: ties between equally fast layouts go to the
// one that needs less memory, then to fewer pipeline and tensor-parallel ranks.
auto rank_key(const Candidate& c) {
  const auto& l = c.layout;
  return std::make_tuple(std::nearbyint(c.step_s * 1e9), c.peak(), l.pp, l.tp, l.chunks, l.schedule, l.checkpoint,
                         l.sequence_parallel);
}

bool two_stages_per_rank(const std::string& schedule) {
  return schedule == "interleaved_1f1b" || schedule == "zbv";
}

} // namespace

const std::vector<std::string>& all_schedules() {
  static const std::vector<std::string> names = {"gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv"};
  return names;
}

const std::vector<std::string>& all_checkpoints() {
  static const std::vector<std::string> names = {"never", "always"};
  return names;
}

int64_t Candidate::peak() const {
  return peak_bytes.empty() ? 0 : *std::max_element(peak_bytes.begin(), peak_bytes.end());
}

std::string format_bytes(double nbytes) {
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
  constexpr double kMiB = 1024.0 * 1024.0;
  if (nbytes >= kGiB / 10) {
    return format("%.2f GiB", nbytes / kGiB);
  }
  return nbytes >= kMiB * 10 ? format("%.1f MiB", nbytes / kMiB) : format("%.3f MiB", nbytes / kMiB);
}

std::vector<Layout> layouts(
    const CostTable& costs,
    int64_t world_size,
    int64_t batch,
    const std::vector<std::string>& schedules,
    int64_t max_chunks,
    const std::vector<std::string>& checkpoints) {
  costs.check();
  const auto count = static_cast<int64_t>(costs.layers.size());
  std::vector<int64_t> layer_time;
  for (int64_t i = 0; i < count; ++i) {
    // What runs outside the layers (the head over the vocabulary: often more than a layer) goes
    // with the last stage, as the step time charges it.
    const double outside = i == count - 1 ? costs.outside_forward.at(1) + costs.outside_backward.at(1) : 0.0;
    layer_time.push_back(std::max<int64_t>(
        1, static_cast<int64_t>((costs.forward[i].at(1) + costs.backward[i].at(1) + outside) * 1e6)));
  }
  std::vector<Layout> found;
  for (const auto pp : divisors(world_size)) {
    if (pp > count) {
      continue;
    }
    // Balanced by time for one and for two stages per rank (where there are the layers for it).
    std::vector<int64_t> balances[3];
    for (const int64_t per_rank : {1, 2}) {
      if (pp * per_rank <= count) {
        balances[per_rank] = balance_by_size(
            layer_time, std::vector<int64_t>(pp * per_rank, std::numeric_limits<int64_t>::max()));
      }
    }
    for (const auto tp : divisors(world_size / pp)) {
      if (std::any_of(costs.tp_must_divide.begin(), costs.tp_must_divide.end(), [&](int64_t n) { return n % tp; })) {
        continue;
      }
      if (costs.experts && tp == 1) {
        // transformers' experts do not run in our pipeline uncut (grouped_mm's meta kernel wants bf16,
        // the eager experts branch on which experts got tokens); tensor parallel replaces them.
        continue;
      }
      const auto dp = world_size / pp / tp;
      if (batch % dp) {
        continue;
      }
      for (const auto chunks : divisors(batch / dp)) {
        if (chunks > max_chunks) {
          continue;
        }
        const std::vector<std::string> no_pipeline = {"1f1b"};
        for (const auto& schedule : pp > 1 ? schedules : no_pipeline) {
          const auto& balance = balances[two_stages_per_rank(schedule) ? 2 : 1];
          if (balance.empty()) {
            continue;
          }
          for (const auto& checkpoint : checkpoints) {
            for (const bool sp : {false, true}) {
              if (sp && !(tp > 1 && costs.sequence_parallel)) {
                continue;
              }
              found.push_back({pp, tp, dp, schedule, chunks, checkpoint, sp, balance, batch});
            }
          }
        }
      }
    }
  }
  return found;
}

Plan search(const CostTable& costs, int64_t world_size, int64_t device_memory, int64_t batch,
            const SearchOptions& options) {
  const std::pair<const char*, int64_t> sizes[] = {
      {"world_size", world_size}, {"batch", batch}, {"max_chunks", options.max_chunks()}};
  for (const auto& [name, value] : sizes) {
    TORCH_CHECK_VALUE(value >= 1, "plan: ", name, " = ", value, "; expected an int >= 1");
  }
  TORCH_CHECK_VALUE(device_memory >= 0, "plan: device_memory = ", device_memory, "; expected bytes >= 0");
  const auto& known = all_schedules();
  bool schedules_known = !options.schedules().empty();
  for (const auto& s : options.schedules()) {
    schedules_known = schedules_known && std::find(known.begin(), known.end(), s) != known.end();
  }
  if (!schedules_known) {
    std::ostringstream given;
    for (const auto& s : options.schedules()) {
      given << "'" << s << "' ";
    }
    TORCH_CHECK_VALUE(false, "plan: schedules = [ ", given.str(), "]; expected some of gpipe, 1f1b, ",
                      "interleaved_1f1b, zb_h1, zbv");
  }
  costs.check();
  std::vector<Candidate> candidates;
  for (auto& layout : layouts(costs, world_size, batch, options.schedules(), options.max_chunks())) {
    const double step = step_seconds(costs, layout);
    auto peaks = peak_bytes(costs, layout);
    candidates.push_back({std::move(layout), step, std::move(peaks), ""});
  }
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const Candidate& a, const Candidate& b) { return rank_key(a) < rank_key(b); });
  if (candidates.empty()) {
    std::ostringstream divide;
    for (size_t i = 0; i < costs.tp_must_divide.size(); ++i) {
      divide << (i ? ", " : "") << costs.tp_must_divide[i];
    }
    TORCH_CHECK_VALUE(false, "plan: no layout of ", options.model_name(), " runs on world_size = ", world_size,
                      " with batch = ", batch, " (tp must divide [", divide.str(), "], pp at most ",
                      costs.layers.size(), " layers, dp must divide the batch)");
  }
  std::vector<Candidate> fitting;
  std::vector<Candidate> over;
  for (const auto& c : candidates) {
    (c.peak() <= device_memory ? fitting : over).push_back(c);
  }
  std::stable_sort(over.begin(), over.end(), [](const Candidate& a, const Candidate& b) {
    return std::make_tuple(a.peak(), rank_key(a)) < std::make_tuple(b.peak(), rank_key(b));
  });
  const auto memory = static_cast<double>(device_memory);
  if (fitting.empty()) {
    const auto& smallest = over.front();
    const auto& l = smallest.layout;
    TORCH_CHECK_VALUE(false, "plan: device_memory = ", format_bytes(memory), " (", device_memory,
                      " bytes) fits no layout of ", options.model_name(), " on ", world_size, " ranks with batch ",
                      batch, "; the smallest needs ", format_bytes(static_cast<double>(smallest.peak())), " (",
                      smallest.peak(), " bytes: pp ", l.pp, " x tp ", l.tp, " x dp ", l.dp, ", ", l.chunks,
                      " micro-batches, checkpoint ", l.checkpoint, "); expected device_memory >= that");
  }
  const auto chosen = options.chosen().value_or(0);
  TORCH_CHECK_VALUE(chosen >= 0 && chosen < static_cast<int64_t>(fitting.size()), "plan: chosen = ", chosen,
                    "; expected an index among the ", fitting.size(), " layouts that fit");
  Plan plan{world_size, device_memory, batch, fitting[chosen], {}, {}, costs};
  const double best = plan.chosen.step_s;
  for (int64_t i = 0; i < static_cast<int64_t>(fitting.size()); ++i) {
    if (i != chosen) {
      auto& c = plan.alternatives.emplace_back(fitting[i]);
      c.reason = format("slower by %.0f%%", (c.step_s / best - 1) * 100);
    }
  }
  for (auto& c : over) {
    c.reason = "does not fit (needs " + format_bytes(static_cast<double>(c.peak())) + ", " +
        format_bytes(static_cast<double>(c.peak() - device_memory)) + " over)";
    if (c.step_s < best) {
      c.reason += format("; %.0f%% faster", (1 - c.step_s / best) * 100);
    }
    plan.rejected.push_back(std::move(c));
  }
  return plan;
}

std::string Plan::to_string() const {
  const auto& c = chosen.layout;
  std::ostringstream out;
  out << "torch_mp::plan: " << world_size << " ranks, " << format_bytes(static_cast<double>(device_memory))
      << " each, batch " << batch << "\n"
      << "chosen: pp " << c.pp << " x tp " << c.tp << " x dp " << c.dp << ", "
      << (c.pp > 1 ? c.schedule : "no pipeline") << ", " << c.chunks << " micro-batch" << (c.chunks > 1 ? "es" : "")
      << ", checkpoint " << c.checkpoint << ", sequence parallel " << (c.sequence_parallel ? "on" : "off")
      << ", layers per stage [";
  for (size_t i = 0; i < c.balance.size(); ++i) {
    out << (i ? ", " : "") << c.balance[i];
  }
  out << "]\n"
      << format("predicted: %.1f ms per step, peak ", chosen.step_s * 1e3)
      << format_bytes(static_cast<double>(chosen.peak())) << " per rank\n\n"
      << format("%3s %2s %2s %2s %-16s %2s %-6s %-3s %8s %10s  verdict\n", "#", "pp", "tp", "dp", "schedule", "M",
                "ckpt", "sp", "step ms", "peak");
  std::vector<const Candidate*> shown = {&chosen};
  for (size_t i = 0; i < alternatives.size() && i < 7; ++i) {
    shown.push_back(&alternatives[i]);
  }
  const auto rejected_shown = std::min<size_t>(rejected.size(), 4);
  for (size_t i = 0; i < rejected_shown; ++i) {
    shown.push_back(&rejected[i]);
  }
  for (size_t i = 0; i < shown.size(); ++i) {
    const auto& l = shown[i]->layout;
    if (i == shown.size() - rejected_shown) {
      out << "    does not fit " << format_bytes(static_cast<double>(device_memory)) << ", least over first:\n";
    }
    out << format("%3zu %2lld %2lld %2lld ", i, static_cast<long long>(l.pp), static_cast<long long>(l.tp),
                  static_cast<long long>(l.dp))
        << format("%-16s ", l.pp > 1 ? l.schedule.c_str() : "-")
        << format("%2lld %-6s %-3s ", static_cast<long long>(l.chunks), l.checkpoint.c_str(),
                  l.sequence_parallel ? "on" : "off")
        << format("%8.1f ", shown[i]->step_s * 1e3)
        << format("%10s", format_bytes(static_cast<double>(shown[i]->peak())).c_str()) << "  "
        << (shown[i]->reason.empty() ? "chosen" : shown[i]->reason) << "\n";
  }
  const auto hidden = alternatives.size() + rejected.size() + 1 - shown.size();
  if (hidden) {
    out << "    ... " << hidden << " more (" << alternatives.size() << " fit in all, " << rejected.size()
        << " do not)\n";
  }
  return out.str();
}

} // namespace torch_mp::planner
