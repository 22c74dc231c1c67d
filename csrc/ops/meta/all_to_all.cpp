// Meta kernel of the primitive all-to-all, in symbolic sizes: dim 0 of the output is the sum of
// output_split_sizes, the other dims are the input's. It never looks up the group.
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "ops/checks.h"

namespace torch_mp {
namespace {

at::Tensor _all_to_all_meta(
    const at::Tensor& self,
    c10::IntArrayRef output_split_sizes,
    c10::IntArrayRef input_split_sizes,
    c10::string_view,
    int64_t group_size) {
  detail::check_all_to_all("torch_mp.all_to_all", self, output_split_sizes, input_split_sizes, group_size);
  auto sizes = self.sym_sizes().vec();
  sizes[0] = c10::SymInt(c10::sum_integers(output_split_sizes));
  return at::empty_symint(sizes, self.options());
}

} // namespace

TORCH_LIBRARY_IMPL(torch_mp, Meta, m) {
  m.impl("_all_to_all", &_all_to_all_meta);
}

} // namespace torch_mp
