#pragma once

// What the tests that compare against the dense model share: a copy of a model to run densely, the
// loss they train with, and the dense gradients' norm.
#include <vector>

#include <torch/torch.h>

// A deep copy of `model` (parameters and buffers), to run the dense reference on.
inline torch::nn::Sequential copy_of(const torch::nn::Sequential& model) {
  return torch::nn::Sequential(std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone()));
}

// Mean squared error, as a function (torch::mse_loss has default arguments, not a function type).
inline at::Tensor mse(const at::Tensor& output, const at::Tensor& target) {
  return torch::mse_loss(output, target);
}

// The dense model's norm of its gradients (torch's formula: the norm of the per-tensor norms).
inline double dense_norm(const torch::nn::Module& model, double norm_type) {
  std::vector<at::Tensor> norms;
  for (const auto& param : model.parameters()) {
    norms.push_back(torch::linalg_vector_norm(param.grad(), norm_type, {}, false, torch::kFloat));
  }
  return torch::linalg_vector_norm(torch::stack(norms), norm_type, {}, false, torch::kFloat).item<double>();
}
