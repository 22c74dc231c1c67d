// Plans the parallel layout of an MLP stack (a torch::nn::Sequential) for 4 ranks at two memory
// limits: torch_mp::plan measures each child's forward and backward time and saved bytes on this
// device with a sample, then searches the pipeline x data-parallel layouts (degrees, schedule,
// micro-batches, recomputation) with the cost model Python's torch_mp.plan uses. Prints each plan
// and checks that the pick fits its limit; a limit nothing fits is refused, naming the smallest
// memory that would.
#include <cstdio>
#include <iostream>

#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

int main() {
  torch::manual_seed(0);
  torch::nn::Sequential model;
  for (int i = 0; i < 8; ++i) {
    model->push_back(torch::nn::Linear(256, 256));
    model->push_back(torch::nn::GELU());
  }
  const auto sample = torch::randn({8, 256});
  const int64_t world_size = 4;
  const int64_t batch = 64;
  const auto roomy = torch_mp::plan(model, world_size, int64_t{1} << 30, batch, sample);
  std::cout << roomy.to_string() << "\n";
  // Tight: the least memory any layout needs, so the plan has to save memory (the same cost table,
  // searched again).
  int64_t least = roomy.chosen.peak();
  for (const auto& c : roomy.alternatives) {
    least = std::min(least, c.peak());
  }
  const auto small = torch_mp::planner::search(roomy.costs, world_size, least, batch);
  std::cout << small.to_string() << "\n";
  if (roomy.chosen.peak() > (int64_t{1} << 30) || small.chosen.peak() > least) {
    std::cerr << "a plan over its limit\n";
    return 1;
  }
  try {
    torch_mp::plan(model, world_size, least / 2, batch, sample);
    std::cerr << "expected a refusal at " << least / 2 << " bytes\n";
    return 1;
  } catch (const c10::ValueError& error) {
    std::cout << "refused as expected: " << error.what_without_backtrace() << "\n";
  }
  return 0;
}
