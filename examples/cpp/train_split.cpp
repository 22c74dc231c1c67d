// Trains a small MLP split layer-wise across two devices next to the same MLP unsplit, and prints
// both losses: they agree step for step. Devices: cuda:0 and cpu where a GPU exists, else cpu twice.
#include <cmath>
#include <cstdio>
#include <iostream>

#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

int main() {
  torch::manual_seed(0);
  torch::nn::Sequential dense(
      torch::nn::Linear(16, 64), torch::nn::ReLU(),
      torch::nn::Linear(64, 64), torch::nn::ReLU(),
      torch::nn::Linear(64, 1));
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(dense->clone());

  std::vector<torch::Device> devices = {torch::kCPU, torch::kCPU};
  if (torch::cuda::is_available()) {
    devices[0] = torch::Device(torch::kCUDA, 0);
  }
  auto split = torch_mp::split(torch::nn::Sequential(copy), devices);
  std::cout << "device map:";
  for (size_t i = 0; i < split->device_map().size(); ++i) {
    std::cout << " " << i << "->" << split->device_map()[i];
  }
  std::cout << "\n";

  const auto inputs = torch::randn({256, 16});
  const auto targets = inputs.pow(2).sum(1, /*keepdim=*/true).sqrt();
  torch::optim::SGD dense_optimizer(dense->parameters(), 0.05);
  torch::optim::SGD split_optimizer(split->parameters(), 0.05);
  double worst = 0;
  for (int step = 0; step < 20; ++step) {
    dense_optimizer.zero_grad();
    split_optimizer.zero_grad();
    auto dense_loss = torch::mse_loss(dense->forward(inputs), targets);
    auto split_loss = torch::mse_loss(split->forward(inputs), targets);
    dense_loss.backward();
    split_loss.backward();
    dense_optimizer.step();
    split_optimizer.step();
    const double a = dense_loss.item<double>(), b = split_loss.item<double>();
    worst = std::max(worst, std::abs(a - b));
    if (step % 5 == 0 || step == 19) {
      std::printf("step %2d  loss unsplit %.6f  split %.6f\n", step, a, b);
    }
  }
  if (worst > 1e-4) {
    std::cerr << "split and unsplit losses differ by " << worst << "\n";
    return 1;
  }
  std::cout << "split and unsplit agree (largest loss difference " << worst << ")\n";
  return 0;
}
