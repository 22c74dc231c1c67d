#include <torch/autograd.h>
#include <torch/library.h>

#include <torch_mp/ops.h>

namespace torch_mp {
namespace {

// forward: copy to `device`; backward: copy the gradient back to the source device. Both directions
// call the dispatcher op, so double backward and torch.compile's tracing see the same operator.
class ToDeviceFunction : public torch::autograd::Function<ToDeviceFunction> {
 public:
  static constexpr bool is_traceable = true;

  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const at::Tensor& self,
      at::Device device,
      bool non_blocking) {
    ctx->saved_data["source_device"] = self.device();
    ctx->saved_data["non_blocking"] = non_blocking;
    at::AutoDispatchBelowADInplaceOrView guard;
    return torch_mp::to_device(self, device, non_blocking);
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    const auto& grad = grad_outputs[0];
    at::Tensor grad_input;
    if (grad.defined()) {
      grad_input = torch_mp::to_device(
          grad, ctx->saved_data["source_device"].toDevice(), ctx->saved_data["non_blocking"].toBool());
    }
    return {grad_input, at::Tensor(), at::Tensor()};
  }
};

at::Tensor to_device_autograd(const at::Tensor& self, at::Device device, bool non_blocking) {
  return ToDeviceFunction::apply(self, device, non_blocking);
}

} // namespace

TORCH_LIBRARY_IMPL(torch_mp, Autograd, m) {
  m.impl("to_device", &to_device_autograd);
}

} // namespace torch_mp
