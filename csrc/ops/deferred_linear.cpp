// deferred_linear: a linear layer whose backward leaves the weight gradient for later, the B/W split
// of the zero-bubble pipeline schedules. The autograd formula and the queue of deferred work live in
// autograd/deferred_linear.cpp; the shapes in meta/deferred_linear.cpp.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <torch_mp/pipeline.h>

namespace torch_mp::pipeline {

at::Tensor deferred_linear(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    int64_t slot) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mp::deferred_linear", "")
                       .typed<decltype(deferred_linear)>();
  return op.call(input, weight, bias, slot);
}

namespace {

at::Tensor deferred_linear_kernel(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    int64_t) {
  TORCH_CHECK_VALUE(
      weight.dim() == 2, "torch_mp.deferred_linear: weight has shape ", weight.sizes(),
      "; expected [out_features, in_features]");
  TORCH_CHECK_VALUE(
      input.dim() >= 1 && input.sym_size(-1) == weight.sym_size(1), "torch_mp.deferred_linear: input has shape ",
      input.sym_sizes(), " but weight ", weight.sizes(), "; expected input [..., ", weight.sym_size(1), "]");
  return at::linear(input, weight, bias);
}

} // namespace

TORCH_LIBRARY_FRAGMENT(torch_mp, m) {
  const std::vector<at::Tag> pt2_compliant{at::Tag::pt2_compliant_tag};
  m.def("deferred_linear(Tensor input, Tensor weight, Tensor? bias, int slot) -> Tensor", pt2_compliant);
}

TORCH_LIBRARY_IMPL(torch_mp, CompositeExplicitAutograd, m) {
  m.impl("deferred_linear", &deferred_linear_kernel);
}

} // namespace torch_mp::pipeline
