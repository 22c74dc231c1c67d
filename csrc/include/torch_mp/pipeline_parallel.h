#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>
#include <torch_mp/comm.h>
#include <torch_mp/pipeline.h>
#include <torch_mp/split.h>

namespace torch_mp {

struct PipelineOptions {
  // Layers per stage, in stage order (num_ranks * stages_per_rank entries, each >= 1); empty: as
  // even as the layer count allows, the first stages taking one more.
  TORCH_ARG(std::vector<int64_t>, balance);
  // Micro-batches per batch, cut along dim 0 as torch::tensor_split does.
  TORCH_ARG(int64_t, chunks) = 1;
  // "gpipe", "1f1b", "interleaved_1f1b", "zb_h1" or "zbv" (see pipeline::ScheduleKind). In the
  // zero-bubble ones the torch::nn::Linear layers' weight gradients wait for W through
  // pipeline::deferred_linear; the other layers' come with B.
  TORCH_ARG(std::string, schedule) = "1f1b";
  // Stages on each rank; 0: 2 for "interleaved_1f1b" and "zbv", 1 otherwise.
  TORCH_ARG(int64_t, stages_per_rank) = 0;
  // This rank's device: its layers move there and activations and gradients travel from there
  // (CPU tensors with Gloo, CUDA tensors with NCCL).
  TORCH_ARG(c10::Device, device) = c10::Device(c10::kCPU);
  // Longest wait for a peer's activations or gradients, or for a send to complete; unset: the
  // group's own timeout (ProcessGroupOptions::timeout).
  TORCH_ARG(std::optional<std::chrono::milliseconds>, timeout) = std::nullopt;
};

// A torch::nn::Sequential run as a pipeline across the ranks of a group: stage s (a contiguous run
// of layers) on rank pipeline::stage_ranks(kind, ranks, stages_per_rank)[s], activations sent
// forward and their gradients back with c10d send/recv, in the order of pipeline::make_schedule
// (GPipe, Huang et al. 2019; 1F1B and interleaved 1F1B, Narayanan et al. 2021; ZB-H1 and ZB-V, Qi
// et al., ICLR 2024; the C++ face of Python's torch_mp.pipeline, whose schedules these are).
//
// Every rank builds the same Sequential (same seed, or loaded from the same checkpoint) and calls
// pipeline_parallel with the same options; the module keeps only its stages' layers, registered
// under the Sequential's names ("2.weight", ...), so its named_parameters() are a subset of the
// dense model's and its state_dict loads from the dense model's. An optimizer over parameters()
// updates this rank's stages.
//
// Each message is a header (its stage, micro-batch, shape, dtype) then the tensor, so receivers
// need not know shapes ahead; a receiver reads a peer's messages in the order sent. Every wait is
// bounded by options.timeout (or the group's): a peer that does not answer, or dies, is a
// CollectiveError naming this rank, the peer and what was awaited.
class PipelineParallelImpl : public torch::nn::Module {
 public:
  PipelineParallelImpl(torch::nn::Sequential sequential, Group group, PipelineOptions options = {});

  // Inference: input [batch, *] (on every rank the same shape; only the first stage's rank reads
  // its values) through every stage without autograd. Returns the output [batch, *] on every rank:
  // the last stage's rank broadcasts it over the group (Python's pipeline(...)(x) does the same),
  // each wait bounded by the timeout. Errors as train_step's.
  at::Tensor forward(const at::Tensor& input);

  // One training step: each micro-batch's forward and backward in the schedule's order, the
  // gradients of this rank's parameters accumulated in .grad() as loss_fn over the whole batch's
  // backward would (each micro-batch's mean loss weighted by its share of the batch). input
  // [batch, *] and target [batch, *], cut alike along dim 0, the same shapes on every rank (the
  // first stage's rank reads input, the last stage's target). Returns the batch's loss, a detached
  // float scalar, on every rank. `timeline` (optional, every rank or none): cleared, then filled
  // with every rank's F, B, W and recv-wait events (seconds since a barrier that starts the step),
  // sorted by stage then start.
  // Before the first message the ranks compare their batch shapes and whether they record a
  // timeline (one all-gather): c10::ValueError naming the fields that differ. c10::ValueError for an
  // empty loss_fn, a 0-dim input or a batch smaller than chunks; for a loss_fn that returns no
  // scalar, raised on the last stage's rank and, as "rank r stopped the step", on the others.
  // CollectiveError for a peer that does not answer within the timeout. After an error the
  // pipeline is unusable (its messages are out of step): c10::Error on later calls.
  // `max_norm` (a number >= 0; every rank the same, compared with the batch shapes): the step ends
  // with torch_mp::clip_grad_norm_(*this, *max_norm), every gradient scaled by the dense model's
  // norm (Python's train_step(..., max_norm=)); c10::ValueError for max_norm < 0 or NaN.
  at::Tensor train_step(
      const at::Tensor& input,
      const at::Tensor& target,
      const LossFunction& loss_fn,
      std::vector<pipeline::TimelineEvent>* timeline = nullptr,
      std::optional<double> max_norm = std::nullopt);

  // Stage s's rank, for every stage.
  const std::vector<int64_t>& stage_ranks() const {
    return stage_ranks_;
  }
  // This rank's stages, ascending.
  std::vector<int64_t> local_stages() const;
  // The Sequential's layer range [first, last) of every stage.
  const std::vector<std::pair<int64_t, int64_t>>& stage_layers() const {
    return stage_layers_;
  }
  const Group& group() const {
    return group_;
  }
  const PipelineOptions& options() const {
    return options_;
  }
  // The group of the Sequential's tensor-parallel layers (torch_mp::tensor_parallel over a Mesh's
  // tp group), whichever stage holds them; nullopt when there are none (or their group has one rank).
  const std::optional<Group>& tensor_parallel_group() const {
    return tensor_parallel_group_;
  }

 private:
  Group group_;
  PipelineOptions options_;
  std::optional<Group> tensor_parallel_group_;
  pipeline::ScheduleKind kind_;
  std::vector<int64_t> stage_ranks_;
  std::vector<std::pair<int64_t, int64_t>> stage_layers_;
  // The Sequential's layers, null for those of other ranks' stages.
  std::vector<torch::nn::AnyModule> layers_;
  int64_t num_layers_ = 0;
  bool broken_ = false;

  at::Tensor run(const at::Tensor& input, const at::Tensor* target, const LossFunction* loss_fn,
                 std::vector<pipeline::TimelineEvent>* timeline, std::optional<double> max_norm);
};
TORCH_MODULE(PipelineParallel);

// The C++ face of torch_mp.pipeline (named pipeline_parallel: torch_mp::pipeline is the namespace
// of the schedules): `sequential` as a pipeline over the ranks of `group`, this rank keeping its
// stages' layers (moved to options.device). Every rank calls it with the same layer count and
// options; they are compared across the group (one all-gather) before anything else is sent.
// Errors, all c10::ValueError and raised before any activation moves: an unknown schedule, chunks
// < 1, stages_per_rank the schedule does not run; a group whose size times stages_per_rank is not
// the length of options.balance; a balance entry < 1 or a balance that does not add up to the
// layer count; a Sequential with fewer layers than stages; options or layer counts that differ
// between ranks (naming each field and every rank's value).
//
// Pipeline x tensor parallel (a 2-D mesh, torch_mp::init_mesh): shard the Sequential with
// torch_mp::tensor_parallel(model, plan, mesh.tp) on every rank, then pipeline it over mesh.pp:
// each stage's layers are sharded over its tp group, whose ranks run the same schedule, each
// sending its activations (replicated, or its shard when a stage ends between a colwise and a
// rowwise layer) to the rank of the next stage with its tp index.
// The options are then compared over the tp group as well (the same c10::ValueError), and
// train_step gives the dense loss and, gathered over tp, the dense gradients.
PipelineParallel pipeline_parallel(torch::nn::Sequential sequential, const Group& group, PipelineOptions options = {});

// Saves a pipeline's parameters and buffers in torch_mp.save's format (torch_mp/_checkpoint/
// format.py): every rank writes its stages' tensors under the stock names ("2.weight") and its CPU
// random state ("rng/cpu/<rank>") into rank-<r>-of-<n>.safetensors; rank 0 joins the ranks'
// manifests into the index, whose model names every layer's tensors, and renames the folder into
// place (`path`.incomplete until then). The result loads in Python with torch_mp.load into the
// dense model, and with torch_mp::load in C++. A collective over the pipeline's group (every rank
// calls it with the same path, on a file system every rank sees). Errors: those of torch_mp::save;
// c10::Error on every rank when another rank failed writing its file.
void save(const PipelineParallel& model, const std::string& path);

// Loads a checkpoint of the dense model (written by torch_mp.save, torch_mp::save or the save
// above, at any world size) into this rank's stages: every parameter and buffer this rank holds
// must be in it, with its shape; the other ranks' tensors are skipped. Restores this rank's CPU
// random state when the checkpoint was saved by as many ranks. Needs no collective. Errors:
// c10::ValueError naming a missing key, a shape that differs, or a corrupted piece.
void load(PipelineParallel& model, const std::string& path);

} // namespace torch_mp
