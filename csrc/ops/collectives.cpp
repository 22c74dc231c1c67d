// Primitive collectives: no autograd, a process group by name and size, fresh output tensors.
// Their kernels call c10d::ProcessGroup; their Meta kernels live in meta/collectives.cpp.
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/library.h>

#include <torch_mp/ops.h>

#include "comm/group.h"
#include "comm/collectives.h"
#include "ops/checks.h"
#include "ops/typed_op.h"

namespace torch_mp {
namespace primitives {

at::Tensor all_reduce(const at::Tensor& self, c10::string_view reduce_op, const Group& group) {
  static const auto op = detail::typed_op<at::Tensor(const at::Tensor&, c10::string_view, c10::string_view, int64_t)>(
      "torch_mp::_all_reduce");
  return op.call(self, reduce_op, group.name, group.size);
}

void all_reduce_start_(at::Tensor& self, c10::string_view reduce_op, const Group& group) {
  static const auto op =
      detail::typed_op<void(at::Tensor&, c10::string_view, c10::string_view, int64_t)>("torch_mp::_all_reduce_start_");
  op.call(self, reduce_op, group.name, group.size);
}

void wait_(at::Tensor& self, at::TensorList meanwhile, const Group& group) {
  static const auto op =
      detail::typed_op<void(at::Tensor&, at::TensorList, c10::string_view, int64_t)>("torch_mp::_wait_");
  op.call(self, meanwhile, group.name, group.size);
}

using DimOp = at::Tensor(const at::Tensor&, int64_t, c10::string_view, int64_t);

at::Tensor all_gather(const at::Tensor& self, int64_t dim, const Group& group) {
  static const auto op = detail::typed_op<DimOp>("torch_mp::_all_gather");
  return op.call(self, dim, group.name, group.size);
}

at::Tensor reduce_scatter(const at::Tensor& self, int64_t dim, const Group& group) {
  static const auto op = detail::typed_op<DimOp>("torch_mp::_reduce_scatter");
  return op.call(self, dim, group.name, group.size);
}

at::Tensor shard(const at::Tensor& self, int64_t dim, const Group& group) {
  static const auto op = detail::typed_op<DimOp>("torch_mp::_shard");
  return op.call(self, dim, group.name, group.size);
}

} // namespace primitives

namespace {

c10d::ReduceOp parse_reduce_op(c10::string_view name) {
  if (name == "sum") return c10d::ReduceOp::SUM;
  if (name == "max") return c10d::ReduceOp::MAX;
  if (name == "min") return c10d::ReduceOp::MIN;
  if (name == "product") return c10d::ReduceOp::PRODUCT;
  TORCH_CHECK_VALUE(false, "torch_mp._all_reduce: reduce_op '", name, "'; expected sum, max, min or product");
}

// The functional all-reduce: its output is a fresh tensor, the one copy of `self` it makes, reduced
// in place. Formulas that own their tensor reduce it in place with the start/wait pair instead.
at::Tensor _all_reduce_kernel(
    const at::Tensor& self,
    c10::string_view reduce_op,
    c10::string_view group_name,
    int64_t group_size) {
  const auto reduction = parse_reduce_op(reduce_op);
  detail::check_group_size("torch_mp.all_reduce", group_size);
  auto output = self.clone(at::MemoryFormat::Contiguous);
  if (group_size == 1) {
    return output;
  }
  auto group = detail::resolve_group("torch_mp.all_reduce", group_name, group_size);
  detail::start_all_reduce("torch_mp.all_reduce", group, output, reduction).wait();
  return output;
}

// Starts reducing `self` in place and returns at once; _wait_ on the same tensor completes it. The
// backend writes `self` until then, so `self` must be contiguous and read by nothing before the wait.
void _all_reduce_start__kernel(
    at::Tensor& self,
    c10::string_view reduce_op,
    c10::string_view group_name,
    int64_t group_size) {
  constexpr auto op = "torch_mp._all_reduce_start_";
  const auto reduction = parse_reduce_op(reduce_op);
  detail::check_group_size(op, group_size);
  TORCH_CHECK_VALUE(
      self.is_contiguous(), op, ": the tensor reduced in place must be contiguous (it has strides ",
      self.strides(), ")");
  if (group_size == 1) {
    return;
  }
  auto group = detail::resolve_group(op, group_name, group_size);
  detail::start_pending(
      self, op, [&] { return detail::start_all_reduce("torch_mp.all_reduce", group, self, reduction); });
}

// Completes the collective started on `self`, bounded by the group's timeout (a CollectiveError after
// it). With a group of one nothing was started. Declared as mutating `self` so that the compiler
// orders every read of `self` after it; `meanwhile`, the tensors computed while the collective runs,
// are read by nothing here: as inputs they keep a compiler's reordering (inductor's, for peak memory)
// from moving their computation after the wait.
void _wait__kernel(at::Tensor& self, at::TensorList, c10::string_view, int64_t group_size) {
  constexpr auto op = "torch_mp._wait_";
  detail::check_group_size(op, group_size);
  TORCH_CHECK(
      detail::wait_registered(self) || group_size == 1, op,
      ": no collective is in flight on this tensor: it was never started, was already waited on, or "
      "the tensor was copied between the start and the wait (a compiler backend that does not "
      "reinplace mutating custom ops would copy it; use inductor)");
}

// Gathers into [group_size, *self.shape] with one flat collective, then lays the blocks along dim.
at::Tensor _all_gather_kernel(const at::Tensor& self, int64_t dim, c10::string_view group_name, int64_t group_size) {
  detail::check_group_size("torch_mp.all_gather", group_size);
  const auto wrapped = detail::wrap_dim("torch_mp.all_gather", self, dim);
  if (group_size == 1) {
    return self.clone(at::MemoryFormat::Contiguous);
  }
  auto group = detail::resolve_group("torch_mp.all_gather", group_name, group_size);
  auto input = self.contiguous();
  std::vector<int64_t> stacked_shape{group_size};
  stacked_shape.insert(stacked_shape.end(), input.sizes().begin(), input.sizes().end());
  auto stacked = at::empty(stacked_shape, input.options());
  detail::all_gather_into("torch_mp.all_gather", group, stacked, input);
  auto sizes = input.sizes().vec();
  sizes[wrapped] *= group_size;
  return stacked.movedim(0, wrapped).reshape(sizes).contiguous();
}

// Reduces over [group_size, *block] with one flat collective, each rank keeping its block.
at::Tensor _reduce_scatter_kernel(
    const at::Tensor& self,
    int64_t dim,
    c10::string_view group_name,
    int64_t group_size) {
  const auto wrapped = detail::check_divisible("torch_mp.reduce_scatter", self, dim, group_size);
  if (group_size == 1) {
    return self.clone(at::MemoryFormat::Contiguous);
  }
  auto group = detail::resolve_group("torch_mp.reduce_scatter", group_name, group_size);
  auto sizes = self.sizes().vec();
  sizes[wrapped] /= group_size;
  std::vector<int64_t> blocks_shape = sizes;
  blocks_shape.insert(blocks_shape.begin() + wrapped, group_size);
  // [.., group_size, size / group_size, ..] with the rank blocks moved first and made contiguous.
  auto blocks = self.reshape(blocks_shape).movedim(wrapped, 0).contiguous();
  auto output = at::empty(sizes, self.options());
  detail::reduce_scatter_into("torch_mp.reduce_scatter", group, output, blocks);
  return output;
}

at::Tensor _shard_kernel(const at::Tensor& self, int64_t dim, c10::string_view group_name, int64_t group_size) {
  const auto wrapped = detail::check_divisible("torch_mp.shard", self, dim, group_size);
  if (group_size == 1) {
    return self.clone(at::MemoryFormat::Contiguous);
  }
  const auto rank = detail::resolve_group("torch_mp.shard", group_name, group_size)->getRank();
  const auto block = self.size(wrapped) / group_size;
  return self.narrow(wrapped, rank * block, block).clone(at::MemoryFormat::Contiguous);
}

} // namespace

TORCH_LIBRARY_FRAGMENT(torch_mp, m) {
  const std::vector<at::Tag> pt2_compliant{at::Tag::pt2_compliant_tag};
  m.def("_all_reduce(Tensor self, str reduce_op, str group_name, int group_size) -> Tensor", pt2_compliant);
  m.def("_all_reduce_start_(Tensor(a!) self, str reduce_op, str group_name, int group_size) -> ()", pt2_compliant);
  m.def("_wait_(Tensor(a!) self, Tensor[] meanwhile, str group_name, int group_size) -> ()", pt2_compliant);
  m.def("_all_gather(Tensor self, int dim, str group_name, int group_size) -> Tensor", pt2_compliant);
  m.def("_reduce_scatter(Tensor self, int dim, str group_name, int group_size) -> Tensor", pt2_compliant);
  m.def("_shard(Tensor self, int dim, str group_name, int group_size) -> Tensor", pt2_compliant);
}

TORCH_LIBRARY_IMPL(torch_mp, CompositeExplicitAutograd, m) {
  m.impl("_all_reduce", &_all_reduce_kernel);
  m.impl("_all_reduce_start_", &_all_reduce_start__kernel);
  m.impl("_wait_", &_wait__kernel);
  m.impl("_all_gather", &_all_gather_kernel);
  m.impl("_reduce_scatter", &_reduce_scatter_kernel);
  m.impl("_shard", &_shard_kernel);
}

} // namespace torch_mp
