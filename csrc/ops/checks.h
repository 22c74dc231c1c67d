#pragma once

#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

namespace torch_mp::detail {

// The async tensor-parallel ops' names in their errors (the forward's checks and the autograd functions).
inline constexpr char kAllGatherMatmul[] = "torch_mp.all_gather_matmul";
inline constexpr char kMatmulReduceScatter[] = "torch_mp.matmul_reduce_scatter";

// Checks that `group_size` is at least 1, naming `op`.
void check_group_size(std::string_view op, int64_t group_size);

// `dim` wrapped into [0, self.dim()); an IndexError naming `op` and the valid range otherwise.
int64_t wrap_dim(std::string_view op, const at::Tensor& self, int64_t dim);

// Checks that `self` splits evenly along `dim` into `group_size` blocks (symbolic sizes pass);
// returns the wrapped dim.
int64_t check_divisible(std::string_view op, const at::Tensor& self, int64_t dim, int64_t group_size);

// Checks an all-to-all's split sizes: one per member of the group, none negative, and the input
// split sizes summing to self's dim 0 (symbolic sizes compare without specializing). `self` has at
// least one dim.
void check_all_to_all(
    std::string_view op,
    const at::Tensor& self,
    c10::IntArrayRef output_split_sizes,
    c10::IntArrayRef input_split_sizes,
    int64_t group_size);

// Checks the arguments of a linear layer's matmul, naming each: `input` [*, features], `weight` a
// matrix [rows, features] (`layout` says which slice of the layer it holds), `bias` [rows] when
// given, all on one device with one dtype. Sizes compare symbolically (no specialization under
// torch.compile).
void check_linear(
    std::string_view op,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    std::string_view layout);

// Checks the arguments of the decomposed all-gather + matmul (ops/async_tp.cpp): `input` [*, features]
// with the gathered `dim` not its last, each weight [rows, features], `chunks` >= 1 dividing the
// input's size along dim. Returns the wrapped dim.
int64_t check_all_gather_matmul(
    std::string_view op,
    const at::Tensor& input,
    at::TensorList weights,
    int64_t dim,
    int64_t chunks,
    int64_t group_size);

// Checks the arguments of the decomposed matmul + reduce-scatter: as many inputs [*, features_i]
// as weights [rows, features_i], every input and `addend` [*, rows] of one shape but the last dim,
// at least one of them given, the size along `dim` (not the last) a multiple of group_size *
// chunks. Returns the wrapped dim.
int64_t check_matmul_reduce_scatter(
    std::string_view op,
    at::TensorList inputs,
    at::TensorList weights,
    const std::optional<at::Tensor>& addend,
    int64_t dim,
    int64_t chunks,
    int64_t group_size);

} // namespace torch_mp::detail
