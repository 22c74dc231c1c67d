// A small next-token model trained as a pipeline across ranks by a LibTorch program, one process
// per rank:
//   torchrun --nproc-per-node 2 --no-python ./train_pipeline [--schedule 1f1b] [--chunks 4] [--steps 20]
//                                                            [--tp 1] [--check-dense]
// The rendezvous is torchrun's (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). Each rank holds only
// its stages' layers; rank 0 prints each step's loss and the tokens per second. With --tp T (and
// T x stages processes: `torchrun --nproc-per-node 4 ... --tp 2`) the ranks form a 2-D mesh,
// tensor parallel innermost: each stage's layers are sharded over its T ranks. With --check-dense
// every rank also trains the dense model on the same batches and exits 1 when a loss differs by
// more than 1e-5 (what CTest runs).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

namespace {

constexpr int64_t kVocab = 64, kWidth = 64, kBatch = 16, kSequence = 32;

torch::nn::Sequential make_model() {
  torch::manual_seed(0); // the same weights on every rank
  return torch::nn::Sequential(
      torch::nn::Embedding(kVocab, kWidth), torch::nn::Linear(kWidth, kWidth), torch::nn::GELU(),
      torch::nn::Linear(kWidth, kWidth), torch::nn::GELU(), torch::nn::Linear(kWidth, kWidth), torch::nn::GELU(),
      torch::nn::Linear(kWidth, kVocab));
}

// logits [batch, sequence, vocab], targets [batch, sequence]: the mean cross-entropy per token.
at::Tensor next_token_loss(const at::Tensor& logits, const at::Tensor& targets) {
  return torch::nn::functional::cross_entropy(logits.flatten(0, 1), targets.flatten());
}

} // namespace

int main(int argc, char** argv) {
  std::string schedule = "1f1b";
  int64_t chunks = 4, steps = 20, tp = 1;
  bool check_dense = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--schedule" && i + 1 < argc) {
      schedule = argv[++i];
    } else if (arg == "--chunks" && i + 1 < argc) {
      chunks = std::stoll(argv[++i]);
    } else if (arg == "--steps" && i + 1 < argc) {
      steps = std::stoll(argv[++i]);
    } else if (arg == "--tp" && i + 1 < argc) {
      tp = std::stoll(argv[++i]);
    } else if (arg == "--check-dense") {
      check_dense = true;
    } else {
      std::cerr << "unknown argument " << arg << "\n";
      return 2;
    }
  }
  // gloo; RANK, WORLD_SIZE, MASTER_ADDR/PORT from torchrun. Pipeline stages across pp = world / tp
  // ranks, each stage's layers sharded over tp ranks (Megatron's MLP pattern: colwise then rowwise).
  const auto world = std::stoll(std::getenv("WORLD_SIZE") ? std::getenv("WORLD_SIZE") : "1");
  const auto mesh = torch_mp::init_mesh(world / std::max<int64_t>(tp, 1), tp);
  const auto& group = mesh.pp;
  const torch_mp::TensorParallelPlan plan = {{"0", "vocab"}, {"[15]", "colwise"}, {"[37]", "rowwise"}};
  auto sharded = torch_mp::tensor_parallel(make_model(), tp > 1 ? plan : torch_mp::TensorParallelPlan{}, mesh.tp);
  auto model =
      torch_mp::pipeline_parallel(sharded, group, torch_mp::PipelineOptions().schedule(schedule).chunks(chunks));
  torch::optim::SGD optimizer(model->parameters(), 0.5);
  auto dense = make_model();
  torch::optim::SGD dense_optimizer(dense->parameters(), 0.5);

  // A rule to learn: each token is followed by the next one, modulo the vocabulary.
  torch::manual_seed(1);
  double worst = 0;
  for (int64_t step = 0; step < steps; ++step) {
    const auto tokens = torch::randint(kVocab, {kBatch, kSequence});
    const auto targets = (tokens + 1) % kVocab;
    const auto start = std::chrono::steady_clock::now();
    optimizer.zero_grad();
    const auto loss = model->train_step(tokens, targets, next_token_loss).item<double>();
    optimizer.step();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::string dense_text;
    if (check_dense) {
      dense_optimizer.zero_grad();
      auto dense_loss = next_token_loss(dense->forward(tokens), targets);
      dense_loss.backward();
      dense_optimizer.step();
      worst = std::max(worst, std::abs(dense_loss.item<double>() - loss));
      dense_text = "  (dense " + std::to_string(dense_loss.item<double>()) + ")";
    }
    if (group.rank == 0 && mesh.tp.rank == 0) {
      std::printf("step %lld  loss %.6f%s  %.0f tokens/s  (%s, pp %lld x tp %lld ranks, %lld micro-batches)\n",
                  static_cast<long long>(step), loss, dense_text.c_str(), kBatch * kSequence / seconds,
                  schedule.c_str(), static_cast<long long>(group.size), static_cast<long long>(mesh.tp.size),
                  static_cast<long long>(chunks));
    }
  }
  torch_mp::destroy_process_group(mesh.pp);
  torch_mp::destroy_process_group(mesh.tp);
  if (worst > 1e-5) {
    std::cerr << "pp rank " << group.rank << " tp rank " << mesh.tp.rank
              << ": the pipeline's losses differ from the dense model's by " << worst << "\n";
    return 1;
  }
  return 0;
}
