// A tensor-parallel MLP trained by a LibTorch program, one process per rank:
//   torchrun --nproc-per-node 2 --no-python ./tensor_parallel_mlp [gloo|nccl]
// Each rank holds half of every weight (column-parallel up projection, row-parallel down projection)
// and the losses equal those of the dense MLP, which every rank also trains to show it.
#include <cmath>
#include <cstdio>
#include <iostream>

#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

int main(int argc, char** argv) {
  torch_mp::ProcessGroupOptions options;
  options.backend = argc > 1 ? argv[1] : "gloo";
  const auto group = torch_mp::init_process_group(options);
  const auto device = options.backend == "nccl" ? torch::Device(torch::kCUDA, group.rank) : torch::Device(torch::kCPU);

  torch::manual_seed(0);  // the same dense model and data on every rank
  torch::nn::Linear up(32, 128), down(128, 32);
  up->to(device);
  down->to(device);
  auto column = torch_mp::nn::column_parallel_from_dense(up, group);
  auto row = torch_mp::nn::row_parallel_from_dense(down, group);
  const auto inputs = torch::randn({64, 32}, device);
  const auto targets = torch::sin(inputs);

  std::vector<at::Tensor> dense_parameters = up->parameters(), parallel_parameters = column->parameters();
  for (const auto& p : down->parameters()) dense_parameters.push_back(p);
  for (const auto& p : row->parameters()) parallel_parameters.push_back(p);
  torch::optim::SGD dense_optimizer(dense_parameters, 0.1), parallel_optimizer(parallel_parameters, 0.1);

  double worst = 0;
  for (int step = 0; step < 10; ++step) {
    dense_optimizer.zero_grad();
    parallel_optimizer.zero_grad();
    auto dense_loss = torch::mse_loss(down->forward(torch::gelu(up->forward(inputs))), targets);
    auto parallel_loss = torch::mse_loss(row->forward(torch::gelu(column->forward(inputs))), targets);
    dense_loss.backward();
    parallel_loss.backward();
    dense_optimizer.step();
    parallel_optimizer.step();
    const double a = dense_loss.item<double>(), b = parallel_loss.item<double>();
    worst = std::max(worst, std::abs(a - b));
    if (group.rank == 0) {
      std::printf("step %d  loss dense %.6f  tensor parallel (%lld ranks) %.6f\n", step, a,
                  static_cast<long long>(group.size), b);
    }
  }
  torch_mp::destroy_process_group(group);
  if (worst > 1e-5) {
    std::cerr << "rank " << group.rank << ": losses differ by " << worst << "\n";
    return 1;
  }
  return 0;
}
