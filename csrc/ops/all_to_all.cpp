// All-to-all along dim 0 with uneven split sizes: the primitive _all_to_all (no autograd) and the
// differentiable all_to_all, whose backward (autograd/all_to_all.cpp) is the reverse all-to-all.
// Expert parallelism routes tokens with it. Meta kernel: meta/all_to_all.cpp.
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <torch_mp/ops.h>

#include "comm/collectives.h"
#include "comm/group.h"
#include "ops/checks.h"
#include "ops/typed_op.h"

namespace torch_mp {

using AllToAllOp = at::Tensor(const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::string_view, int64_t);

at::Tensor all_to_all(const at::Tensor& self, c10::IntArrayRef output_splits, c10::IntArrayRef input_splits,
                      const Group& group) {
  static const auto op = detail::typed_op<AllToAllOp>("torch_mp::all_to_all");
  return op.call(self, output_splits, input_splits, group.name, group.size);
}

at::Tensor primitives::all_to_all(const at::Tensor& self, c10::IntArrayRef output_splits,
                                  c10::IntArrayRef input_splits, const Group& group) {
  static const auto op = detail::typed_op<AllToAllOp>("torch_mp::_all_to_all");
  return op.call(self, output_splits, input_splits, group.name, group.size);
}

namespace {

constexpr auto kOp = "torch_mp.all_to_all";

at::Tensor _all_to_all_kernel(
    const at::Tensor& self,
    c10::IntArrayRef output_split_sizes,
    c10::IntArrayRef input_split_sizes,
    c10::string_view group_name,
    int64_t group_size) {
  detail::check_all_to_all(kOp, self, output_split_sizes, input_split_sizes, group_size);
  auto sizes = self.sizes().vec();
  sizes[0] = c10::sum_integers(output_split_sizes);
  if (group_size == 1) {
    TORCH_CHECK_VALUE(
        output_split_sizes == input_split_sizes, detail::scoped_op(kOp), ": output_split_sizes ", output_split_sizes,
        " differ from input_split_sizes ", input_split_sizes, " in a group of one; expected equal sizes");
    return self.clone(at::MemoryFormat::Contiguous);
  }
  auto group = detail::resolve_group(kOp, group_name, group_size);
  auto input = self.contiguous();
  auto output = at::empty(sizes, input.options());
  detail::all_to_all_into(kOp, group, output, input, output_split_sizes.vec(), input_split_sizes.vec());
  return output;
}

at::Tensor all_to_all_kernel(
    const at::Tensor& self,
    c10::IntArrayRef output_split_sizes,
    c10::IntArrayRef input_split_sizes,
    c10::string_view group_name,
    int64_t group_size) {
  return primitives::all_to_all(
      self, output_split_sizes, input_split_sizes, Group{std::string(group_name), group_size, 0});
}

} // namespace

TORCH_LIBRARY_FRAGMENT(torch_mp, m) {
  const std::vector<at::Tag> pt2_compliant{at::Tag::pt2_compliant_tag};
  m.def(
      "_all_to_all(Tensor self, int[] output_split_sizes, int[] input_split_sizes, str group_name, "
      "int group_size) -> Tensor", pt2_compliant);
  m.def(
      "all_to_all(Tensor self, int[] output_split_sizes, int[] input_split_sizes, str group_name, "
      "int group_size) -> Tensor", pt2_compliant);
}

TORCH_LIBRARY_IMPL(torch_mp, CompositeExplicitAutograd, m) {
  m.impl("_all_to_all", &_all_to_all_kernel);
  m.impl("all_to_all", &all_to_all_kernel);
}

} // namespace torch_mp
