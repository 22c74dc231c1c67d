#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace torch_mp::pipeline {

// GPipe: every micro-batch forward, then every backward. 1F1B: after a warm-up, each stage
// alternates one forward and one backward, so it holds at most (stages - stage) micro-batches.
// Interleaved 1F1B (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
// Clusters Using Megatron-LM", 2021; Megatron-Core's interleaved schedule): several stages per
// rank (stage s on rank s % ranks), which shrinks the bubble by that factor.
enum class ScheduleKind { GPipe, OneFOneB, Interleaved1F1B };

// "gpipe", "1f1b" or "interleaved_1f1b" to its kind and back. c10::ValueError naming the accepted
// names for any other string.
ScheduleKind parse_schedule_kind(const std::string& name);
std::string schedule_kind_name(ScheduleKind kind);

// One compute step of a rank: the forward (F) or backward (B) of one micro-batch (0-based, of
// `chunks`) on one stage (0-based, of num_ranks * stages_per_rank).
struct Action {
  bool backward;
  int64_t stage;
  int64_t microbatch;
  bool operator==(const Action&) const = default;
};

// The compute actions of each rank, in the order that rank runs them. Activations and gradients
// move between consecutive stages: F(s, m) receives from stage s - 1 and sends to stage s + 1,
// B(s, m) receives from stage s + 1 and sends to stage s - 1, stage s living on rank s % num_ranks.
//
// Each rank runs W forwards (the warm-up), then alternates one forward and one backward, then runs
// the backwards left. W = every forward for GPipe; num_ranks - rank - 1 for 1F1B (and interleaved
// 1F1B with one stage per rank); for interleaved 1F1B Megatron-Core's (num_ranks - rank - 1) * 2 +
// (stages_per_rank - 1) * G; at most the rank's forward count. So a rank keeps the activations of
// at most W + 1 forwards (over all its stages) whose backward has not run. Forwards go micro-batch
// group by group, inside a group stage by stage of the rank, every micro-batch of the group per
// stage; backwards in the same order with the rank's stages reversed. Groups hold num_ranks
// micro-batches; G is the largest group.
//
// Any micro-batch count works for every kind. Megatron-Core's interleaving, with its default group
// of num_ranks micro-batches, requires chunks to be a multiple of num_ranks: it refuses fewer
// micro-batches than ranks, and a last group smaller than num_ranks, whose forwards would wait on
// backwards still to come (with blocking receives and its warm-up, a deadlock: 4 ranks x 3
// stages, 5 micro-batches). Here the remainder joins the last full group instead (G = num_ranks +
// chunks % num_ranks; one group of all the micro-batches, G = chunks, when chunks < 2 * num_ranks):
// a longer warm-up, (stages_per_rank - 1) * (chunks % num_ranks) more micro-batches in flight, none
// when chunks is a multiple of num_ranks. Every schedule made passes check_schedule before it is
// returned (tests run it over ranks 1-8, stages per rank 1-4, chunks 1-32, every kind).
// Throws c10::ValueError for sizes < 1, or for '1f1b' with stages_per_rank != 1.
std::vector<std::vector<Action>> make_schedule(
    ScheduleKind kind,
    int64_t num_ranks,
    int64_t stages_per_rank,
    int64_t chunks);

// Verifies a schedule before anything runs: every F and B of every (stage, micro-batch) appears
// once, on the rank holding the stage; each backward comes after its forward on its rank ("runs
// B(...) before its forward"); and running it cannot deadlock when sends never block and a
// receive blocks until its message has been sent (the transports read a peer's messages in the
// order sent, keeping those wanted later) ("it deadlocks: rank r waits in ... for ..."). Throws
// c10::ValueError naming the first problem otherwise.
void check_schedule(
    const std::vector<std::vector<Action>>& schedule,
    int64_t num_stages,
    int64_t chunks);

} // namespace torch_mp::pipeline
