// Autocast (torch.autocast; at::autocast::set_autocast_enabled in C++) for every torch_mp operator,
// declared as PyTorch declares its own (aten/src/ATen/autocast_mode.cpp, whose cast wrappers this
// file reuses) on the AutocastCPU and AutocastCUDA keys:
// - the matmuls run in the autocast dtype, as aten::linear does: their floating-point tensors are
//   cast to it (a parameter's cast cached for the autocast region), then the op runs without autocast;
// - the vocabulary-parallel cross entropy runs in float32, as aten::cross_entropy_loss does;
// - the collectives, copies and the embedding lookup pass through: they run in the dtype of what
//   arrives.
// Every operator is listed, so that a new one must choose.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "ops/typed_op.h"

namespace torch_mp {
namespace {

using at::autocast::CastPolicy;

// Calls the operator `Name` again through the dispatcher (the caller has excluded the autocast key).
template <const char* Name, class Signature>
struct Redispatch;
template <const char* Name, class Ret, class... Args>
struct Redispatch<Name, Ret(Args...)> {
  static Ret call(Args... args) {
    static const auto op = detail::typed_op<Ret(Args...)>(Name);
    return op.call(args...);
  }
};

template <CastPolicy policy, c10::DeviceType device, const char* Name, class Signature>
void cast_then_run(torch::Library& m) {
  using Wrapped =
      typename at::autocast::WrapFunction<policy, device, Signature, Signature, &Redispatch<Name, Signature>::call>::type;
  m.impl(Name, TORCH_FN(Wrapped::call));
}

using LinearOp = at::Tensor(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool, c10::string_view, int64_t);
using RowPrimitiveOp =
    at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, int64_t);
using DeferredLinearOp = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t);
using AllGatherMatmulOp = std::tuple<at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, at::TensorList, int64_t, int64_t, c10::string_view, int64_t);
using MatmulReduceScatterOp =
    at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, c10::string_view, int64_t);
using MatmulReduceScatterPrimitiveOp = at::Tensor(
    at::TensorList, at::TensorList, const std::optional<at::Tensor>&, int64_t, int64_t, c10::string_view, int64_t);
using CrossEntropyOp =
    at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, c10::string_view, int64_t);

constexpr char kColumnParallelLinearSchema[] = "torch_mp::column_parallel_linear";
constexpr char kRowParallelLinearSchema[] = "torch_mp::row_parallel_linear";
constexpr char kRowParallelLinearPrimitiveSchema[] = "torch_mp::_row_parallel_linear";
constexpr char kDeferredLinearSchema[] = "torch_mp::deferred_linear";
constexpr char kAllGatherMatmulSchema[] = "torch_mp::all_gather_matmul";
constexpr char kMatmulReduceScatterSchema[] = "torch_mp::matmul_reduce_scatter";
constexpr char kMatmulReduceScatterPrimitiveSchema[] = "torch_mp::_matmul_reduce_scatter";
constexpr char kVocabParallelCrossEntropySchema[] = "torch_mp::vocab_parallel_cross_entropy";

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  constexpr auto lower = CastPolicy::lower_precision_fp;
  cast_then_run<lower, device, kColumnParallelLinearSchema, LinearOp>(m);
  cast_then_run<lower, device, kRowParallelLinearSchema, LinearOp>(m);
  cast_then_run<lower, device, kRowParallelLinearPrimitiveSchema, RowPrimitiveOp>(m);
  cast_then_run<lower, device, kDeferredLinearSchema, DeferredLinearOp>(m);
  cast_then_run<lower, device, kAllGatherMatmulSchema, AllGatherMatmulOp>(m);
  cast_then_run<lower, device, kMatmulReduceScatterSchema, MatmulReduceScatterOp>(m);
  cast_then_run<lower, device, kMatmulReduceScatterPrimitiveSchema, MatmulReduceScatterPrimitiveOp>(m);
  cast_then_run<CastPolicy::fp32, device, kVocabParallelCrossEntropySchema, CrossEntropyOp>(m);
  for (const char* name :
       {"copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp", "reduce_scatter_to_sp", "gather_from_sp",
        "vocab_parallel_embedding", "_all_reduce", "_all_reduce_start_", "_wait_", "_all_gather", "_reduce_scatter",
        "_shard", "_all_to_all", "all_to_all", "to_device"}) {
    m.impl(name, torch::CppFunction::makeFallthrough());
  }
}

} // namespace

TORCH_LIBRARY_IMPL(torch_mp, AutocastCPU, m) {
  register_autocast<c10::DeviceType::CPU>(m);
}

TORCH_LIBRARY_IMPL(torch_mp, AutocastCUDA, m) {
  register_autocast<c10::DeviceType::CUDA>(m);
}

} // namespace torch_mp
