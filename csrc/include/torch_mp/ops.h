#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <tuple>
#include <vector>

namespace torch_mp {

// Copies `self` to `device` and returns the copy, always a fresh tensor (also when `self` is already
// there). Backward: the gradient goes back to the device `self` came from.
// The same operator is torch.ops.torch_mp.to_device in Python.
at::Tensor to_device(const at::Tensor& self, at::Device device, bool non_blocking = false);

} // namespace torch_mp

#include <torch_mp/comm.h>

namespace torch_mp {

// --- tensor parallelism: conjugate pairs (Megatron's mappings). Each is differentiable; with a
// group of one member each is a local copy. `dim` may be negative.

// forward: identity; backward: all-reduce (sum). Where a replicated input enters the parallel region.
at::Tensor copy_to_tp(const at::Tensor& self, const Group& group);
// forward: all-reduce (sum); backward: identity. Where partial results leave it.
at::Tensor reduce_from_tp(const at::Tensor& self, const Group& group);
// forward: all-gather along dim; backward: this rank's slice.
at::Tensor gather_from_tp(const at::Tensor& self, int64_t dim, const Group& group);
// forward: this rank's slice along dim; backward: all-gather.
at::Tensor scatter_to_tp(const at::Tensor& self, int64_t dim, const Group& group);
// Sequence parallel. forward: reduce-scatter along dim; backward: all-gather.
at::Tensor reduce_scatter_to_sp(const at::Tensor& self, int64_t dim, const Group& group);
// Sequence parallel. forward: all-gather along dim; backward: reduce-scatter.
at::Tensor gather_from_sp(const at::Tensor& self, int64_t dim, const Group& group);

// y = input @ weight.T + bias with weight holding this rank's rows (output features); the input is
// replicated. gather_output: all-gather y along its last dim. In backward, the all-reduce of the
// input gradient runs while the weight gradient is computed.
at::Tensor column_parallel_linear(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    bool gather_output,
    const Group& group);
// y = all_reduce(input @ weight.T) + bias with weight holding this rank's columns (input features);
// the bias is added once, after the reduction. input_is_parallel=false: the input is replicated and
// this rank takes its slice of the last dim first.
at::Tensor row_parallel_linear(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    bool input_is_parallel,
    const Group& group);
// An embedding whose rows [vocab_start, vocab_start + weight.size(0)) live on this rank.
at::Tensor vocab_parallel_embedding(
    const at::Tensor& input,
    const at::Tensor& weight,
    int64_t vocab_start,
    const Group& group);
// Cross entropy per target over logits sharded on the vocabulary (last) dim, this rank holding
// [vocab_start, vocab_start + logits.size(-1)); the logits are never gathered. Targets equal to
// ignore_index give 0.
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

// All-to-all along dim 0 with uneven split sizes (counted in rows, one per member of the group).
// self: [sum(input_split_sizes), *]; rows [sum(input_split_sizes[:r]), +input_split_sizes[r]) go to
// rank r. Result: [sum(output_split_sizes), *], output_split_sizes[r] rows from rank r, in rank order;
// output_split_sizes[r] must equal what rank r sends here. forward: this all-to-all; backward: the
// reverse all-to-all (the split sizes swapped), each row's gradient back to the rank that sent it.
// Expert parallelism dispatches tokens to their experts' ranks with it and combines them back.
at::Tensor all_to_all(
    const at::Tensor& self,
    c10::IntArrayRef output_split_sizes,
    c10::IntArrayRef input_split_sizes,
    const Group& group);

namespace primitives {

// The collectives under the ops above, without autograd. Each returns a fresh tensor.
// reduce_op: "sum", "max", "min" or "product".
at::Tensor all_reduce(const at::Tensor& self, c10::string_view reduce_op, const Group& group);
// The asynchronous pair (c10d's functional collectives and wait_tensor, copy-free): all_reduce_start_
// starts reducing the contiguous `self` in place and returns at once; wait_(self) completes it,
// bounded by the group's timeout (CollectiveError). Nothing may read `self` in between. Under
// torch.compile both are mutating ops that inductor reinplaces, so independent compute can run
// between them; `meanwhile` names the tensors computed in between, which the compiler then keeps
// before the wait.
void all_reduce_start_(at::Tensor& self, c10::string_view reduce_op, const Group& group);
void wait_(at::Tensor& self, at::TensorList meanwhile, const Group& group);
at::Tensor all_gather(const at::Tensor& self, int64_t dim, const Group& group);
at::Tensor reduce_scatter(const at::Tensor& self, int64_t dim, const Group& group);
// This rank's slice of `self` along dim.
at::Tensor split(const at::Tensor& self, int64_t dim, const Group& group);
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
// torch_mp::all_to_all without autograd.
at::Tensor all_to_all(
    const at::Tensor& self,
    c10::IntArrayRef output_split_sizes,
    c10::IntArrayRef input_split_sizes,
    const Group& group);

} // namespace primitives
} // namespace torch_mp
