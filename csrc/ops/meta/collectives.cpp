// Meta kernels of the primitive collectives, in symbolic sizes so dynamic shapes trace. They never
// look up the group: its size is an argument.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/checks.h"

namespace torch_mp {
namespace {

at::Tensor _all_reduce_meta(const at::Tensor& self, c10::string_view, c10::string_view, int64_t) {
  return at::empty_symint(self.sym_sizes(), self.options());
}

// The start/wait pair writes its tensor in place: nothing to compute under a fake tensor.
void _all_reduce_start__meta(at::Tensor&, c10::string_view, c10::string_view, int64_t) {}
void _wait__meta(at::Tensor&, at::TensorList, c10::string_view, int64_t) {}

at::Tensor _all_gather_meta(const at::Tensor& self, int64_t dim, c10::string_view, int64_t group_size) {
  detail::check_group_size("torch_mp.all_gather", group_size);
  auto sizes = self.sym_sizes().vec();
  sizes[detail::wrap_dim("torch_mp.all_gather", self, dim)] *= group_size;
  return at::empty_symint(sizes, self.options());
}

at::Tensor shard_meta(const at::Tensor& self, int64_t dim, c10::string_view, int64_t group_size) {
  const auto wrapped = detail::check_divisible("torch_mp.reduce_scatter/shard", self, dim, group_size);
  auto sizes = self.sym_sizes().vec();
  sizes[wrapped] = sizes[wrapped] / group_size;
  return at::empty_symint(sizes, self.options());
}

} // namespace

TORCH_LIBRARY_IMPL(torch_mp, Meta, m) {
  m.impl("_all_reduce", &_all_reduce_meta);
  m.impl("_all_reduce_start_", &_all_reduce_start__meta);
  m.impl("_wait_", &_wait__meta);
  m.impl("_all_gather", &_all_gather_meta);
  m.impl("_reduce_scatter", &shard_meta);
  m.impl("_shard", &shard_meta);
}

} // namespace torch_mp
