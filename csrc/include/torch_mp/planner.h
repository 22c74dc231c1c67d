#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/arg.h>
#include <torch/nn/modules/container/sequential.h>

// The planner: which parallel layout (pipeline, tensor and data-parallel degrees, schedule,
// micro-batches, recomputation) runs a model fastest within a device's memory, from a cost table
// measured once. One implementation: Python's torch_mp.plan calls this one through torch_mp._C, so
// the two plan alike by construction. After Alpa (Zheng et al., OSDI 2022) and Megatron-LM's rules
// of thumb (Narayanan et al., 2021), with a search small enough to enumerate.
namespace torch_mp::planner {

// Seconds as a function of the rows of a micro-batch: fixed + per_row * rows (the fixed part is what
// small micro-batches pay per call: kernel launches, dispatch).
struct Line {
  double fixed = 0.0;
  double per_row = 0.0;
  double at(double rows) const {
    return fixed + per_row * rows;
  }
  // The line through (1, one_row) and (rows, at_rows); proportional for one row; a measured slope
  // below zero (noise) is flattened to zero.
  static Line through(double one_row, int64_t rows, double at_rows);
  bool operator==(const Line&) const = default;
};

// The alpha-beta model of a link (Hockney 1994): alpha_s seconds per message plus beta_s_per_byte
// per byte.
struct Link {
  double alpha_s = 50e-6;
  double beta_s_per_byte = 1e-9;
  bool operator==(const Link&) const = default;
};

// What the cost model reads, for one model, one device and the links of its mesh (the fields of
// Python's torch_mp.CostTable, same names and units). Times are seconds on the device per layer
// (`layers` in order) and for what runs outside the layers (charged to the last stage). Bytes of
// parameters per layer and outside (first_*: with the first stage, embeddings; last_*: with the
// last, final norm and head), each with the part tensor parallelism divides (sharded_*).
// activation_bytes: what autograd saves per sample row in each layer's forward; boundary_bytes: a
// layer's output per row (what a stage sends, what a tensor-parallel all-reduce carries);
// output_bytes: the model's floating-point output per row (0: not counted). Collectives: ring
// all-reduce 2 (n - 1) (alpha + beta * bytes / n), the 2 (n - 1) steps of a ring's reduce-scatter
// and all-gather (Thakur et al. 2005), a send alpha + beta * bytes;
// each mesh dim over its own link (tp_link, dp_link, pp_link), or the fitted alpha_s and
// beta_s_per_byte where unset. tp_must_divide: the counts tensor parallelism must divide (heads,
// experts; {1} allows no tensor parallelism); all_reduces_per_layer: a transformer block's 2;
// experts: per MoE layer (0: none); sequence_parallel: whether sequence parallelism applies.
struct CostTable {
  std::vector<std::string> layers;
  std::vector<Line> forward;
  std::vector<Line> backward;
  Line outside_forward;
  Line outside_backward;
  std::vector<int64_t> param_bytes;
  std::vector<int64_t> sharded_param_bytes;
  int64_t first_param_bytes = 0;
  int64_t first_sharded_bytes = 0;
  int64_t last_param_bytes = 0;
  int64_t last_sharded_bytes = 0;
  // Of first_param_bytes, those tied to a module after the layers (GPT-2's head, the embedding's
  // weight), which a pipeline's last stage holds too; tied_sharded_bytes the part TP divides.
  int64_t tied_param_bytes = 0;
  int64_t tied_sharded_bytes = 0;
  std::vector<int64_t> activation_bytes;
  int64_t outside_activation_bytes = 0;
  int64_t boundary_bytes = 0;
  int64_t output_bytes = 0;
  int64_t param_element_size = 4;
  double alpha_s = 50e-6;
  double beta_s_per_byte = 1e-9;
  std::vector<int64_t> tp_must_divide;
  int64_t all_reduces_per_layer = 2;
  int64_t experts = 0;
  bool sequence_parallel = false;
  std::optional<Link> tp_link;
  std::optional<Link> dp_link;
  std::optional<Link> pp_link;
  // Ranks that share one host's processors (CPU ranks): host_cores, how many of them compute at full
  // speed at once (the host's cores / each rank's threads), and host_ranks, the ranks on a host.
  // The times above are measured with all host_ranks computing at once; a pipeline whose other
  // ranks wait computes faster (speedup). host_cores = 0: each rank computes on a device of its own.
  double host_cores = 0.0;
  int64_t host_ranks = 1;

  // speedup[b - 1]: how much faster than the table each rank computes while b of a pipeline's pp
  // ranks compute (their tensor- and data-parallel ranks with them): min(1, host_cores / busy) over
  // its value with every host rank busy, busy = host_ranks * b / pp (ranks spread evenly over
  // hosts). Empty for host_cores = 0 (a device per rank: no sharing).
  std::vector<double> speedup(int64_t pp) const;
  // The link of mesh dim "tp", "dp" or "pp" (c10::ValueError for another name).
  Link link(const std::string& dim) const;
  // Seconds of a ring all-reduce of nbytes over `ranks` ranks of mesh dim `dim` (0 for one rank).
  double all_reduce_s(double nbytes, int64_t ranks, const std::string& dim) const;
  // Seconds of a send of nbytes between pipeline ranks (the "pp" link).
  double send_s(double nbytes) const;
  // c10::ValueError naming the field whose length is not the layer count, or a size < 0.
  void check() const;
};

// One candidate: the degrees, the schedule and its micro-batches (chunks), the checkpoint policy
// ("never" or "always"; a pipeline's "except_last" is costed as "never"), sequence parallelism,
// the layer counts per stage (balance: pp entries, or 2 pp for interleaved_1f1b and zbv, which run
// two stages per rank), the samples per step (batch, all data-parallel groups together) and
// fully_shard: FSDP2 shards each stage's parameters over the dp replicas (pipeline(...,
// fully_shard=True); costed by stage_peaks, never proposed by search).
struct Layout {
  int64_t pp = 1;
  int64_t tp = 1;
  int64_t dp = 1;
  std::string schedule = "1f1b";
  int64_t chunks = 1;
  std::string checkpoint = "never";
  bool sequence_parallel = false;
  std::vector<int64_t> balance;
  int64_t batch = 1;
  bool fully_shard = false;

  // Samples per micro-batch on one data-parallel group: batch / dp / chunks.
  double rows() const;
  int64_t stages_per_rank() const;
  // The pipeline rank of each stage, as the pipeline places them (pipeline::stage_ranks).
  std::vector<int64_t> stage_ranks() const;
  bool operator==(const Layout&) const = default;
};

// Predicted bytes one rank of a stage holds at its rank's peak, by kind: the parameters, their
// gradients held then, the optimizer state (AdamW, 2 x fp32), the flat gradients of the
// data-parallel all-reduce (reduced in place), and the activations (with the loss's gradients, the
// zero-bubble schedules' pending weight gradients' inputs and what the pipeline keeps of finished
// micro-batches).
struct StagePeak {
  int64_t parameters = 0;
  int64_t gradients = 0;
  int64_t optimizer = 0;
  int64_t flat = 0;
  int64_t activations = 0;
  int64_t total() const {
    return parameters + gradients + optimizer + flat + activations;
  }
  bool operator==(const StagePeak&) const = default;
};

// Seconds of one micro-batch's forward (F), backward (B) and weight-gradient action (W, the
// zero-bubble schedules) per stage.
struct StageTimes {
  std::vector<double> forward;
  std::vector<double> backward;
  std::vector<double> weight;
};

// Predicted bytes per pipeline stage at its rank's peak (a rank's stages sum to its peak): each
// rank's actions (make_schedule; without a pipeline F then B per micro-batch) replayed, the peak the
// largest of what is held at the start of each action and at the data-parallel all-reduce. A
// forward adds a micro-batch's saved tensors (with checkpoint "always" its stage input), its B
// frees them; a zero-bubble B leaves a third of the layers' (the linears' inputs) and on the last
// stage the head's output gradient to its W (nothing when recomputing); at a B, the loss's two
// output gradients on the last stage and, recomputing, the micro-batch's saved tensors; a B or W
// adding to existing gradients, half the stage's widest layer's; gradients exist from a stage's
// first B; finished micro-batches keep their input gradient (every stage but the first; the
// output is dropped once its loss is made); at the step's end every gradient exists; the
// all-reduce holds one more copy of the rank's gradients (flat, reduced in place) and those
// finished micro-batches' tensors. Tensor parallelism divides matrices and (with sequence parallelism all, else 24/34 of) the layers' saved
// activations (Korthikanti et al., 2022). In full: the docstring of Python's
// torch_mp._planner.model.stage_peaks.
std::vector<StagePeak> stage_peaks(const CostTable& costs, const Layout& layout);
// Predicted peak bytes per pipeline rank: stage_peaks summed over each rank's stages.
std::vector<int64_t> peak_bytes(const CostTable& costs, const Layout& layout);
// Per stage: the layers' compute divided by tp, plus their all-reduces over the "tp" link (forward
// and backward alike), plus the recomputed forward under checkpoint "always"; what runs outside the
// layers goes to the last stage; zero-bubble schedules give half of each backward to W (Qi et al.,
// ICLR 2024, section 2).
StageTimes stage_times(const CostTable& costs, const Layout& layout);
// Seconds from the first action to the last of pipeline::make_schedule(schedule, ranks,
// durations' stages / ranks, chunks), each rank running its actions in order, each action starting
// once its rank is free and its input has arrived (send_s after its producer ended on another
// rank): F(s, m) after F(s - 1, m); B(s, m) after B(s + 1, m), the last stage's after its F;
// W(s, m) after B(s, m). While b ranks run an action each, each runs speedup[b - 1] times as fast as
// its duration says (ranks sharing a host's cores: CostTable::speedup; empty: 1). c10::ValueError for
// durations whose lengths differ or do not divide into `ranks`, or a speedup of another length or
// not > 0.
double simulate(
    const std::string& schedule,
    int64_t ranks,
    int64_t chunks,
    const StageTimes& durations,
    double send_s,
    const std::vector<double>& speedup = {});
// Predicted seconds of one training step: the simulated schedule over stage_times (a send of the
// stage output between ranks over the "pp" link; CostTable::speedup for ranks sharing cores),
// then the data-parallel all-reduce of the largest rank's gradients over the "dp" link.
double step_seconds(const CostTable& costs, const Layout& layout);

// The schedules the search considers by default, and the checkpoint policies.
const std::vector<std::string>& all_schedules();
const std::vector<std::string>& all_checkpoints();

// Every layout the library can run: pp x tp x dp = world_size; the stages at most the layers; tp
// dividing every count of costs.tp_must_divide (and, with experts, tp > 1); dp dividing the batch,
// the micro-batches (up to max_chunks) dividing each group's rows; sequence parallel only with
// tp > 1 and costs.sequence_parallel; a schedule only with pp > 1 (else "1f1b"). Stages balanced by
// forward + backward time of one row (balance_by_size).
std::vector<Layout> layouts(
    const CostTable& costs,
    int64_t world_size,
    int64_t batch,
    const std::vector<std::string>& schedules = all_schedules(),
    int64_t max_chunks = 8,
    const std::vector<std::string>& checkpoints = all_checkpoints());

// A layout with its predicted seconds per step and peak bytes per pipeline rank, and why it was not
// chosen ("" for the pick).
struct Candidate {
  Layout layout;
  double step_s = 0.0;
  std::vector<int64_t> peak_bytes;
  std::string reason;
  int64_t peak() const;
};

// The planner's answer: the chosen candidate, the alternatives that fit ("slower by x%", ranked by
// step time), the rejected ones ("does not fit (needs X, Y over)", least over first) and the cost
// table it came from. to_string(): a readable summary.
struct Plan {
  int64_t world_size = 1;
  int64_t device_memory = 0;
  int64_t batch = 1;
  Candidate chosen;
  std::vector<Candidate> alternatives;
  std::vector<Candidate> rejected;
  CostTable costs;
  std::string to_string() const;
};

// Bytes as the plans print them: "1.50 GiB", "12.0 MiB", "0.500 MiB".
std::string format_bytes(double nbytes);

struct SearchOptions {
  // The pipeline schedules to consider (those of pipeline::ScheduleKind's names).
  TORCH_ARG(std::vector<std::string>, schedules) = all_schedules();
  // The most micro-batches per step.
  TORCH_ARG(int64_t, max_chunks) = 8;
  // The model's name in errors.
  TORCH_ARG(std::string, model_name) = "the model";
  // The index, among the layouts that fit (in rank order), of the one to choose; unset: the first
  // (Python's plan(measure=...) chooses the fastest measured).
  TORCH_ARG(std::optional<int64_t>, chosen) = std::nullopt;
};

// Every layout of `layouts` costed and ranked by predicted step time (to the nanosecond), ties by
// peak memory, then by pp, tp, chunks, schedule, checkpoint, sequence parallelism; those over
// device_memory bytes rejected. Deterministic: a pure function of its arguments. c10::ValueError
// naming the argument for world_size, batch or max_chunks < 1, device_memory < 0, an unknown
// schedule, a chosen index out of range, when no layout runs at all (tp, pp and dp constraints),
// and when none fits, naming the smallest device_memory one would need.
Plan search(const CostTable& costs, int64_t world_size, int64_t device_memory, int64_t batch,
            const SearchOptions& options = {});

} // namespace torch_mp::planner

namespace torch_mp {

struct PlanOptions {
  // The pipeline schedules to consider.
  TORCH_ARG(std::vector<std::string>, schedules) = planner::all_schedules();
  // The most micro-batches per step.
  TORCH_ARG(int64_t, max_chunks) = 8;
  // The link of every mesh dim (all-reduces and sends); unset: CostTable's defaults (50 us, 1 GB/s).
  TORCH_ARG(std::optional<planner::Link>, collectives) = std::nullopt;
};

// The cost table of a torch::nn::Sequential on the device of its parameters (the sample's), with
// the definitions of Python's measure_costs: each child's forward and backward time (the fastest of
// three after a warm-up) on `sample` and on its first row, a Line in the rows; the bytes each
// child's forward leaves saved for the backward (allocated while it runs and alive when the
// forward ends, each storage counted in the child that saves it first; parameters not counted)
// and its output per row; the parameter bytes per child (matrices as the sharded part). The
// model's gradients, buffers and modes are left as found. tp_must_divide = {1}: a plain Sequential
// has no tensor-parallel layers, so only pp x dp layouts are planned. c10::ValueError for an empty
// Sequential or a sample without a batch dim, or a model whose output does not require grad.
planner::CostTable measure_costs(torch::nn::Sequential model, const at::Tensor& sample);

// The C++ face of torch_mp.plan: the layout (pp x dp, schedule, micro-batches, checkpoint,
// balance) of `model` for world_size ranks of device_memory_bytes each and `batch` samples per
// step, from measure_costs(model, sample) and planner::search. Each child is a layer the pipeline
// may cut between. Errors: those of measure_costs and planner::search.
planner::Plan plan(
    torch::nn::Sequential model,
    int64_t world_size,
    int64_t device_memory_bytes,
    int64_t batch,
    const at::Tensor& sample,
    const PlanOptions& options = {});

} // namespace torch_mp
