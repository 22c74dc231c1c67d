#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace torch_mp::pipeline {

// GPipe: every micro-batch forward, then every backward. 1F1B: after a warm-up, each stage
// alternates one forward and one backward, so it holds at most (stages - stage) micro-batches.
// Interleaved 1F1B (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
// Clusters Using Megatron-LM", 2021; Megatron-Core's interleaved schedule): several stages per
// rank (stage s on rank s % ranks), which shrinks the bubble by that factor.
// The zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024) split each
// backward in two: B, the input gradient the previous stage waits for, and W, the weight gradient
// nobody waits for, run later to fill what would be bubbles. ZB-H1: one stage per rank, 1F1B's
// warm-up and order of F and B, rank r running its W r micro-batches late (so each rank holds at
// most as many micro-batches as 1F1B's first rank). ZB-V: two stages per rank placed in a V (rank r
// holds stages r and 2 * ranks - 1 - r, so the first and the last stage share rank 0), the paper's
// section 6 schedule.
enum class ScheduleKind { GPipe, OneFOneB, Interleaved1F1B, ZeroBubbleH1, ZeroBubbleV };

// "gpipe", "1f1b", "interleaved_1f1b", "zb_h1" or "zbv" to its kind and back. c10::ValueError
// naming the accepted names for any other string.
ScheduleKind parse_schedule_kind(const std::string& name);
std::string schedule_kind_name(ScheduleKind kind);

// F: a forward. B: a backward; in the zero-bubble schedules only the input gradient and the
// weight gradients that are not deferred (see deferred_linear), elsewhere the whole backward.
// W: the deferred weight gradients of a (stage, micro-batch); only the zero-bubble schedules have W.
enum class ActionKind : int8_t { Forward = 0, Backward = 1, Weight = 2 };

// One compute step of a rank: kind F, B or W of one micro-batch (0-based, of `chunks`) on one
// stage (0-based, of num_ranks * stages_per_rank).
struct Action {
  ActionKind kind;
  int64_t stage;
  int64_t microbatch;
  bool operator==(const Action&) const = default;
};

// An action as torch.distributed.pipelining prints one: stage, kind, micro-batch ("1F0", "3W2").
std::string to_string(const Action& action);

// The rank holding each stage (entry s: the rank of stage s). Stage s on rank s % num_ranks, except
// for ZB-V: rank s for s < num_ranks, rank 2 * num_ranks - 1 - s after. Throws c10::ValueError for
// sizes < 1 and for the stages_per_rank a kind does not run (see make_schedule).
std::vector<int64_t> stage_ranks(ScheduleKind kind, int64_t num_ranks, int64_t stages_per_rank);

// The compute actions of each rank, in the order that rank runs them. Activations and gradients
// move between consecutive stages: F(s, m) receives from stage s - 1 and sends to stage s + 1,
// B(s, m) receives from stage s + 1 and sends to stage s - 1, stage s living on the rank
// stage_ranks gives; W(s, m) moves nothing.
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
// ZB-H1 and ZB-V: see ScheduleKind; ZB-V with fewer than 2 * num_ranks - 1 micro-batches runs the
// schedule of that many without the missing ones (torch.distributed.pipelining's
// ScheduleZBVZeroBubble does the same).
// Throws c10::ValueError for sizes < 1, for '1f1b' or 'zb_h1' with stages_per_rank != 1, or for
// 'zbv' with stages_per_rank != 2.
std::vector<std::vector<Action>> make_schedule(
    ScheduleKind kind,
    int64_t num_ranks,
    int64_t stages_per_rank,
    int64_t chunks);

// Verifies a schedule before anything runs: every F and B of every (stage, micro-batch) appears
// once, on the rank holding the stage; each backward comes after its forward on its rank ("runs
// B(...) before its forward"); either no W at all or every W once, after its B ("runs W(...)
// before its backward"); and running it cannot deadlock when sends never block and a receive
// blocks until its message has been sent (the transports read a peer's messages in the order
// sent, keeping those wanted later) ("it deadlocks: rank r waits in ... for ..."). Throws
// c10::ValueError naming the first problem otherwise. `stage_ranks`: the rank of each stage.
void check_schedule(
    const std::vector<std::vector<Action>>& schedule,
    const std::vector<int64_t>& stage_ranks,
    int64_t chunks);
// The same with stage s on rank s % ranks (num_stages a multiple of the rank count).
void check_schedule(
    const std::vector<std::vector<Action>>& schedule,
    int64_t num_stages,
    int64_t chunks);

// --- a picture of a step as it ran -------------------------------------------------------------

// One interval of a pipeline step on one stage, as torch_mp.TimelineEvent in Python: kind "F"
// (forward), "B" (backward; input and weight gradients unless a W follows), "W" (weight gradients
// a zero-bubble schedule deferred) or "recv-wait" (the stage blocked receiving another stage's
// activations or gradients; inside the F or B that needed them). start and end: seconds since the
// step started.
struct TimelineEvent {
  int64_t stage;
  std::string kind;
  int64_t micro_batch;
  double start;
  double end;
  bool operator==(const TimelineEvent&) const = default;
};

// --- the B/W split of a linear layer ----------------------------------------------------------

// y = input @ weight.T + bias, as at::linear. Backward (the B of a zero-bubble schedule) returns the
// input gradient only and queues the weight and bias gradients' work (input, grad of y) under
// `slot`, one slot per (stage, micro-batch); run_weight_gradients(slot) (the W) does it later. The
// weight and bias must be leaves (parameters) for that, or the weight the transpose of a 2-D leaf
// (a parameter stored [in, out], as transformers' Conv1D keeps it: its gradient is written in
// that layout); otherwise, with slot < 0, or under a
// backward that builds a graph (create_graph=True), backward returns every gradient at once as
// at::linear's does. The same operator is torch.ops.torch_mp.deferred_linear in Python.
at::Tensor deferred_linear(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    int64_t slot);

// The first of `count` fresh slots (count >= 0), unique in this process: every pipeline of the
// process, Python's included, takes its slots here. Thread-safe.
int64_t allocate_weight_gradient_slots(int64_t count);

// Runs the weight-gradient work queued under `slot`, in the order queued, accumulating into each
// weight's and bias's .grad as autograd does (set when undefined, added otherwise). Returns how many
// linear calls it finished. Thread-safe; work queued on other slots may run at the same time.
int64_t run_weight_gradients(int64_t slot);
// Linear calls whose weight gradients wait under `slot`.
int64_t pending_weight_gradients(int64_t slot);
// Drops the work queued under `slot` without running it (a step that failed half-way).
void discard_weight_gradients(int64_t slot);

} // namespace torch_mp::pipeline
