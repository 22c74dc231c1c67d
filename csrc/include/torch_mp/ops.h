#pragma once

// The torch_mp operators through their typed C++ entry points. Each function here calls the
// dispatcher op of the same name (torch.ops.torch_mp.<name> in Python; the primitives call
// torch_mp::_<name>), so C++ and Python run the same kernels, autograd formulas and Meta kernels.
//
// Conventions for every function below:
// - `world` is group.size; `r` is this process's rank in the group. With a group of one member
//   (Group::single()) every op is a local computation returning a fresh tensor and needs no
//   registered process group.
// - Outputs are fresh tensors, never views or aliases of an input.
// - `dim` may be negative (counted from the end).
// - Errors, each naming the operator (and in backward "<op> backward"):
//   c10::ValueError: group.size < 1; no process group named group.name is registered, or it has
//     another size; a size along `dim` that does not split into `world` equal blocks; shapes
//     that do not fit, devices that differ.
//   c10::IndexError: `dim` outside [-self.dim(), self.dim()).
//   c10::TypeError: a dtype the op cannot take (integer logits, float indices, weight and input
//     dtypes that differ).
//   torch_mp::CollectiveError: a collective that did not complete within the group's timeout, or
//     whose backend failed (a peer rank died); the group is not usable afterwards.
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <tuple>
#include <vector>

#include <torch_mp/comm.h>

namespace torch_mp {

// --- moving tensors between devices ----------------------------------------------------------

// [*] on self.device() -> [*] on `device`: always a fresh copy, also when `self` is already there.
// forward: copy to `device`; backward: copy the gradient back to the device `self` came from.
// c10::ValueError when `device` is not available in this process (no such CUDA index, no backend).
at::Tensor to_device(const at::Tensor& self, at::Device device, bool non_blocking = false);

// --- tensor parallelism: the conjugate pairs ---------------------------------------------------
// Megatron-LM's mappings (Shoeybi et al., "Megatron-LM", 2019; Megatron-Core's
// tensor_parallel/mappings.py). Each is differentiable, its backward the conjugate op, itself
// differentiable (double backward works).

// [*] -> [*]. Where a replicated input enters the parallel region.
// forward: identity (a copy); backward: all-reduce (sum) of the gradient.
at::Tensor copy_to_tp(const at::Tensor& self, const Group& group);
// [*] -> [*], summed over the ranks. Where partial results leave the parallel region.
// forward: all-reduce (sum); backward: identity.
at::Tensor reduce_from_tp(const at::Tensor& self, const Group& group);
// [..., n, ...] -> [..., n * world, ...] along dim, the ranks' blocks in rank order.
// forward: all-gather along dim; backward: this rank's block of the gradient (scatter_to_tp).
at::Tensor gather_from_tp(const at::Tensor& self, int64_t dim, const Group& group);
// [..., n * world, ...] -> [..., n, ...]: block r, [r * n, (r + 1) * n) along dim.
// forward: this rank's block; backward: all-gather of the gradient (gather_from_tp).
// c10::ValueError when the size along dim is not a multiple of world.
at::Tensor scatter_to_tp(const at::Tensor& self, int64_t dim, const Group& group);
// Sequence parallel (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
// Models", 2022). [..., n * world, ...] -> [..., n, ...]: block r of the sum over the ranks.
// forward: reduce-scatter (sum) along dim; backward: all-gather of the gradient (gather_from_sp).
// c10::ValueError when the size along dim is not a multiple of world.
at::Tensor reduce_scatter_to_sp(const at::Tensor& self, int64_t dim, const Group& group);
// Sequence parallel. [..., n, ...] -> [..., n * world, ...] along dim, in rank order.
// forward: all-gather along dim; backward: reduce-scatter (sum) of the gradient (reduce_scatter_to_sp).
at::Tensor gather_from_sp(const at::Tensor& self, int64_t dim, const Group& group);

// --- tensor parallelism: layers' functional forms ------------------------------------------------

// input [*, in_features] (replicated), weight [out_features / world, in_features] (this rank's
// rows), bias [out_features / world] or none -> y = input @ weight.T + bias, [*, out_features /
// world]; gather_output: all-gathered along the last dim, [*, out_features].
// forward: the local matmul (then the all-gather); backward: the input gradient's all-reduce (sum)
// starts in place before the weight-gradient matmul and is waited on after it, so the two overlap.
// c10::ValueError for shapes that do not fit, c10::TypeError for dtypes that differ.
at::Tensor column_parallel_linear(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    bool gather_output,
    const Group& group);
// input [*, in_features / world] (this rank's features; input_is_parallel=false: [*, in_features],
// replicated, of which this rank takes block r of the last dim first), weight [out_features,
// in_features / world] (this rank's columns), bias [out_features] or none -> [*, out_features] =
// all_reduce(input @ weight.T) + bias, complete on every rank; the bias is added once, after the
// reduction. forward: the local matmul and an all-reduce (sum) in place in its output; backward:
// local matmuls, no collective (with input_is_parallel=false the input gradient is all-gathered).
// c10::ValueError for shapes that do not fit, c10::TypeError for dtypes that differ.
at::Tensor row_parallel_linear(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    bool input_is_parallel,
    const Group& group);
// input [*] integer token ids (replicated), weight [rows, embedding_dim] holding the vocabulary
// rows [vocab_start, vocab_start + rows) -> [*, embedding_dim], the full embeddings on every rank.
// forward: the local lookup (ids outside this rank's rows give 0) and an all-reduce (sum);
// backward: the gradient of this rank's rows only, no collective.
// c10::TypeError for non-integer ids; c10::ValueError for a weight that is not a matrix.
at::Tensor vocab_parallel_embedding(
    const at::Tensor& input,
    const at::Tensor& weight,
    int64_t vocab_start,
    const Group& group);
// The cross entropy of each target, in nats: logits [*, vocab_shard] sharded on the vocabulary
// (last) dim, this rank holding the classes [vocab_start, vocab_start + vocab_shard); target [*]
// integer class ids over the whole vocabulary -> [*] losses (not reduced; targets equal to
// ignore_index give 0). The logits are never gathered: forward: all-reduces (max, then sum) of
// [*]-sized statistics; backward: softmax minus the one-hot target on this rank's shard, no
// collective. Reduced-precision logits are summed in float32. For the reduced loss over a batch
// see torch_mp::nn::VocabParallelCrossEntropyLoss.
// c10::TypeError for integer logits or non-integer targets; c10::ValueError when the shapes differ.
at::Tensor vocab_parallel_cross_entropy(
    const at::Tensor& logits,
    const at::Tensor& target,
    int64_t vocab_start,
    int64_t ignore_index,
    const Group& group);

// --- async tensor parallelism (sequence parallel layers) -------------------------------------
// The collective around a sequence-parallel matmul, decomposed into chunks that overlap with the
// matmuls (Wang et al., ASPLOS 2023; torchtitan's async TP): c10d's asynchronous work handles start
// one chunk's collective while another chunk's matmul computes. `dim` is the sequence dim (any dim
// but the last, the features); `chunks` >= 1 splits each rank's rows along it further (it must
// divide them). With a group of one member each is a local matmul. Numbers: each output row is the
// same dot products as the undecomposed form, but BLAS may block a smaller matmul differently, so
// results agree to fp32 rounding, bitwise where the backend blocks alike.

// gathered = all_gather(input, dim) (gather_from_sp), outputs[i] = gathered @ weights[i].T, for the
// column-parallel layers that read one gathered input (q, k, v; gate, up).
// input: [*, S / group size, *, in_features]; weights[i]: [out_features_i / group size, in_features].
// Returns gathered [*, S, *, in_features] and outputs[i] [*, S, *, out_features_i / group size].
// forward: this rank's rows multiply while the first chunk is gathered, then each chunk's rows of the
// other ranks while the next is gathered; backward: the input gradient is the matmul +
// reduce-scatter below (grad gathered + sum_i grad_i @ weights[i], reduce-scattered), decomposed the
// same way. Errors: ValueError naming the argument (weights empty, shapes, chunks), IndexError (dim).
std::tuple<at::Tensor, std::vector<at::Tensor>> all_gather_matmul(
    const at::Tensor& input,
    at::TensorList weights,
    int64_t dim,
    const Group& group,
    int64_t chunks = 1);
// reduce_scatter(input @ weight.T, dim) (row-parallel layer + reduce_scatter_to_sp).
// input: [*, S, *, in_features / group size]; weight: [out_features, in_features / group size].
// Returns [*, S / group size, *, out_features]. forward: each rank's rows (per chunk) multiply and are
// summed onto that rank (a reduce) while the next rank's rows multiply; backward: all_gather_matmul.
at::Tensor matmul_reduce_scatter(
    const at::Tensor& input,
    const at::Tensor& weight,
    int64_t dim,
    const Group& group,
    int64_t chunks = 1);

// --- expert parallelism ---------------------------------------------------------------------

// All-to-all along dim 0 with uneven split sizes (counted in rows, one per member of the group):
// [sum(input_split_sizes), *] -> [sum(output_split_sizes), *]. Rows
// [sum(input_split_sizes[:q]), + input_split_sizes[q]) go to rank q; the result holds
// output_split_sizes[q] rows from each rank q, in rank order; output_split_sizes[q] must equal
// what rank q sends here. forward: this all-to-all; backward: the reverse all-to-all (the split
// sizes swapped), each row's gradient back to the rank that sent it. Expert parallelism (GShard,
// Lepikhin et al., 2020) dispatches tokens to their experts' ranks with it and combines them back.
// c10::ValueError when a list does not hold one non-negative size per member, the input split
// sizes do not sum to self.size(0), or (group of one) the two lists differ.
at::Tensor all_to_all(
    const at::Tensor& self,
    c10::IntArrayRef output_split_sizes,
    c10::IntArrayRef input_split_sizes,
    const Group& group);

namespace primitives {

// The collectives under the ops above, without autograd (the ops torch_mp::_<name>). Each returns
// a fresh contiguous tensor unless it says otherwise.

// [*] -> [*] reduced over the ranks. reduce_op: "sum", "max", "min" or "product" (c10::ValueError
// otherwise).
at::Tensor all_reduce(const at::Tensor& self, c10::string_view reduce_op, const Group& group);
// The asynchronous pair (c10d's functional collectives and wait_tensor, copy-free): all_reduce_start_
// starts reducing the contiguous `self` in place and returns at once; wait_(self) completes it,
// bounded by the group's timeout (CollectiveError). Nothing may read `self` in between. Under
// torch.compile both are mutating ops that inductor reinplaces, so independent compute can run
// between them; `meanwhile` names the tensors computed in between, which the compiler then keeps
// before the wait. c10::ValueError when `self` is not contiguous; c10::Error from wait_ when no
// collective is in flight on `self` (never started, waited on already, or `self` was copied).
void all_reduce_start_(at::Tensor& self, c10::string_view reduce_op, const Group& group);
void wait_(at::Tensor& self, at::TensorList meanwhile, const Group& group);
// [..., n, ...] -> [..., n * world, ...] along dim, in rank order.
at::Tensor all_gather(const at::Tensor& self, int64_t dim, const Group& group);
// [..., n * world, ...] -> [..., n, ...]: block r of the sum over the ranks (c10::ValueError when
// the size along dim is not a multiple of world).
at::Tensor reduce_scatter(const at::Tensor& self, int64_t dim, const Group& group);
// [..., n * world, ...] -> [..., n, ...]: this rank's shard, block r along dim (c10::ValueError when
// the size along dim is not a multiple of world). No communication.
at::Tensor shard(const at::Tensor& self, int64_t dim, const Group& group);
// reduce_scatter(addend + sum_i inputs[i] @ weights[i].T, dim), decomposed as matmul_reduce_scatter,
// without autograd (all_gather_matmul's backward). addend may be undefined; inputs may be empty
// when it is not.
at::Tensor matmul_reduce_scatter(
    at::TensorList inputs,
    at::TensorList weights,
    const std::optional<at::Tensor>& addend,
    int64_t dim,
    const Group& group,
    int64_t chunks = 1);
// torch_mp::all_to_all without autograd: the same shapes and errors.
at::Tensor all_to_all(
    const at::Tensor& self,
    c10::IntArrayRef output_split_sizes,
    c10::IntArrayRef input_split_sizes,
    const Group& group);

} // namespace primitives
} // namespace torch_mp
