#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace torch_mp::pipeline {

// GPipe: every micro-batch forward, then every backward. 1F1B: after a warm-up, each stage
// alternates one forward and one backward, so it holds at most (stages - stage) micro-batches.
// Interleaved 1F1B: several stages per rank (stage s on rank s % ranks), a smaller bubble.
enum class ScheduleKind { GPipe, OneFOneB, Interleaved1F1B };

ScheduleKind parse_schedule_kind(const std::string& name);
std::string schedule_kind_name(ScheduleKind kind);

struct Action {
  bool backward;
  int64_t stage;
  int64_t microbatch;
  bool operator==(const Action&) const = default;
};

// The compute actions of each rank, in the order that rank runs them. Activations and gradients
// move between consecutive stages: F(s, m) receives from stage s - 1 and sends to stage s + 1,
// B(s, m) receives from stage s + 1 and sends to stage s - 1, stage s living on rank s % num_ranks.
// The order comes from simulating the ranks (a backward costing twice a forward) under the kind's
// rule, so it is deadlock-free by construction; check_schedule verifies it all the same.
std::vector<std::vector<Action>> make_schedule(
    ScheduleKind kind,
    int64_t num_ranks,
    int64_t stages_per_rank,
    int64_t chunks);

// Verifies a schedule before anything runs: every F and B of every (stage, micro-batch) appears
// once, on the rank holding the stage; each rank's backward follows its forward; between any two
// ranks the messages are received in the order they are sent (NCCL matches them by order alone);
// and running it with blocking receives cannot deadlock. Throws c10::ValueError naming the
// first problem otherwise.
void check_schedule(
    const std::vector<std::vector<Action>>& schedule,
    int64_t num_stages,
    int64_t chunks);

} // namespace torch_mp::pipeline
