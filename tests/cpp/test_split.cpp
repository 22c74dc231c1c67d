#include <atomic>
#include <map>
#include <tuple>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "dense.h"
#include "error_of.h"

namespace {

torch::nn::Sequential make_mlp() {
  return torch::nn::Sequential(
      torch::nn::Linear(8, 32), torch::nn::ReLU(), torch::nn::Linear(32, 32), torch::nn::ReLU(),
      torch::nn::Linear(32, 4));
}

std::vector<torch::Device> two_stages() {
  return {torch::kCPU, torch::kCPU};
}

// A copy of `model` with the same weights, to split while `model` stays the dense reference.
} // namespace

TEST(Split, MatchesUnsplitModelThroughAnOptimizerStep) {
  torch::manual_seed(0);
  auto dense = make_mlp();
  auto split = torch_mp::split(
      copy_of(dense),
      two_stages());
  ASSERT_EQ(split->device_map().size(), 5u);

  auto dense_names = dense->named_parameters().keys();
  auto split_names = split->named_parameters().keys();
  EXPECT_EQ(dense_names, split_names);

  torch::optim::Adam dense_optimizer(dense->parameters(), 1e-2);
  torch::optim::Adam split_optimizer(split->parameters(), 1e-2);
  auto input = torch::randn({16, 8});
  for (int step = 0; step < 2; ++step) {
    auto dense_out = dense->forward(input);
    auto split_out = split->forward(input);
    ASSERT_TRUE(torch::allclose(dense_out, split_out, 1e-5, 1e-6));
    dense_out.pow(2).mean().backward();
    split_out.pow(2).mean().backward();
    auto dense_params = dense->named_parameters();
    auto split_params = split->named_parameters();
    for (const auto& name : dense_names) {
      EXPECT_TRUE(torch::allclose(dense_params[name].grad(), split_params[name].grad(), 1e-5, 1e-6)) << name;
    }
    dense_optimizer.step();
    split_optimizer.step();
    dense_optimizer.zero_grad();
    split_optimizer.zero_grad();
  }
  auto dense_params = dense->named_parameters();
  auto split_params = split->named_parameters();
  for (const auto& name : dense_names) {
    EXPECT_TRUE(torch::allclose(dense_params[name], split_params[name], 1e-5, 1e-6)) << name;
  }
}

TEST(Split, ExplicitBalance) {
  auto split = torch_mp::split(make_mlp(), two_stages(), torch_mp::SplitOptions().balance({1, 4}));
  EXPECT_EQ(split->device_map().size(), 5u);
  EXPECT_EQ(split->forward(torch::randn({3, 8})).sizes(), (std::vector<int64_t>{3, 4}));
}

TEST(Split, BalanceBySizeEvensOutBytes) {
  const int64_t unlimited = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(torch_mp::balance_by_size({10, 10, 10, 10}, {unlimited, unlimited}), (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(torch_mp::balance_by_size({40, 10, 10, 10, 10}, {unlimited, unlimited}),
            (std::vector<int64_t>{1, 4}));
  EXPECT_EQ(torch_mp::balance_by_size({10, 10, 10, 10}, {10, unlimited}), (std::vector<int64_t>{1, 3}));
}

TEST(Split, BalanceBySizeBreaksTiesByLayerCount) {
  // Heavy ends (an embedding, a head) fix the largest load; the middle devices share the rest evenly.
  const int64_t unlimited = std::numeric_limits<int64_t>::max();
  const std::vector<int64_t> four(4, unlimited);
  EXPECT_EQ(torch_mp::balance_by_size({19, 3, 3, 3, 3, 3, 3, 19}, four), (std::vector<int64_t>{1, 3, 3, 1}));
  EXPECT_EQ(torch_mp::balance_by_size({40, 1, 1, 1, 1, 1, 1}, {unlimited, unlimited, unlimited}),
            (std::vector<int64_t>{1, 3, 3}));
}

TEST(Split, BalanceBySizeLeavesNoDeviceEmptyAmongEqualCuts) {
  // Parameter-free layers weigh nothing: every cut is as good by load, and [0, 2] left a device idle.
  const int64_t unlimited = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(torch_mp::balance_by_size({0, 0}, {unlimited, unlimited}), (std::vector<int64_t>{1, 1}));
  for (const auto& counts : {torch_mp::balance_by_size({0, 0, 0, 0}, {unlimited, unlimited, unlimited}),
                             torch_mp::balance_by_size({7, 0, 0}, {unlimited, unlimited}),
                             torch_mp::balance_by_size({0, 0, 7}, {unlimited, unlimited, unlimited})}) {
    for (const auto count : counts) {
      EXPECT_GE(count, 1);
    }
  }
  // Fewer layers than devices, or a capacity that holds nothing: empty runs remain possible.
  EXPECT_EQ(torch_mp::balance_by_size({5}, {unlimited, unlimited}).size(), 2u);
  EXPECT_EQ(torch_mp::balance_by_size({5, 5}, {0, unlimited}), (std::vector<int64_t>{0, 2}));
}

TEST(Split, BadInputIsAClearError) {
  EXPECT_NE(error_of([] { torch_mp::split(make_mlp(), two_stages(), torch_mp::SplitOptions().balance({1, 1})); })
                .find("adds up to 2 layers but the model has 5 layers"),
            std::string::npos);
  EXPECT_NE(error_of([] { torch_mp::split(make_mlp(), two_stages(), torch_mp::SplitOptions().max_memory({100, 100})); })
                .find("cannot hold the model"),
            std::string::npos);
  EXPECT_NE(error_of([] { torch_mp::split(torch::nn::Sequential(), two_stages()); }).find("nothing to split"),
            std::string::npos);
  EXPECT_NE(error_of([] { torch_mp::split(make_mlp(), {}); }).find("no devices given"), std::string::npos);
  if (torch::cuda::device_count() < 8) {
    EXPECT_NE(error_of([] { torch_mp::split(make_mlp(), {torch::kCPU, torch::Device("cuda:7")}); })
                  .find("device 'cuda:7' is not available"),
              std::string::npos);
  }
}

namespace {

// Dense and pipelined copies from the same weights: one training step each, the same loss,
// gradients and parameters after an SGD step.
void expect_train_step_matches(const std::string& schedule, const std::string& checkpoint, int64_t chunks) {
  torch::manual_seed(0);
  auto dense = make_mlp();
  auto piped = torch_mp::split(
      copy_of(dense),
      {torch::kCPU, torch::kCPU, torch::kCPU},
      torch_mp::SplitOptions().balance({2, 2, 1}).chunks(chunks).schedule(schedule).checkpoint(checkpoint));
  auto input = torch::randn({10, 8});
  auto target = torch::randn({10, 4});
  auto loss_fn = mse;

  auto expected = loss_fn(dense->forward(input), target);
  expected.backward();
  auto loss = piped->train_step(input, target, loss_fn);
  EXPECT_TRUE(torch::allclose(loss, expected.detach(), 1e-5, 1e-6)) << loss << " vs " << expected;
  torch::optim::SGD(dense->parameters(), 0.1).step();
  torch::optim::SGD(piped->parameters(), 0.1).step();
  auto dense_params = dense->named_parameters();
  for (const auto& item : piped->named_parameters()) {
    EXPECT_TRUE(torch::allclose(item.value().grad(), dense_params[item.key()].grad(), 1e-5, 1e-6))
        << schedule << " " << checkpoint << " " << item.key();
    EXPECT_TRUE(torch::allclose(item.value(), dense_params[item.key()], 1e-5, 1e-6)) << item.key();
  }
}

} // namespace

TEST(PipelinedSplit, TrainStepMatchesDenseForEveryScheduleAndCheckpoint) {
  for (const auto* schedule : {"gpipe", "1f1b", "zb_h1"}) {
    for (const auto* checkpoint : {"never", "except_last", "always"}) {
      for (const int64_t chunks : {2, 3, 10}) {
        expect_train_step_matches(schedule, checkpoint, chunks);
      }
    }
  }
}

// ZB-H1: each (stage, micro-batch) gets a slot for its linears' weight gradients, and each W runs
// that slot's work: nothing is left queued after the step.
TEST(PipelinedSplit, ZeroBubbleRunsEveryDeferredWeightGradient) {
  torch::manual_seed(0);
  auto piped = torch_mp::split(
      make_mlp(), {torch::kCPU, torch::kCPU, torch::kCPU},
      torch_mp::SplitOptions().balance({2, 2, 1}).chunks(4).schedule("zb_h1"));
  const auto first = torch_mp::pipeline::allocate_weight_gradient_slots(0);
  piped->train_step(torch::randn({10, 8}), torch::randn({10, 4}), mse);
  EXPECT_EQ(torch_mp::pipeline::allocate_weight_gradient_slots(0), first + 3 * 4);
  for (int64_t slot = first; slot < first + 3 * 4; ++slot) {
    EXPECT_EQ(torch_mp::pipeline::pending_weight_gradients(slot), 0) << slot;
  }
  for (const auto& param : piped->parameters()) {
    EXPECT_TRUE(param.grad().defined());
  }
}

TEST(PipelinedSplit, ForwardMergesMicroBatchesAndBackwardReachesEveryStage) {
  torch::manual_seed(0);
  auto dense = make_mlp();
  auto piped = torch_mp::split(
      copy_of(dense),
      two_stages(), torch_mp::SplitOptions().chunks(4));
  auto input = torch::randn({9, 8});
  auto output = piped->forward(input);
  auto expected = dense->forward(input);
  ASSERT_TRUE(torch::allclose(output, expected, 1e-5, 1e-6));
  output.pow(2).mean().backward();
  expected.pow(2).mean().backward();
  auto dense_params = dense->named_parameters();
  for (const auto& item : piped->named_parameters()) {
    EXPECT_TRUE(torch::allclose(item.value().grad(), dense_params[item.key()].grad(), 1e-5, 1e-6)) << item.key();
  }
}

TEST(PipelinedSplit, RejectsBadOptionsWithClearErrors) {
  auto make = [](torch_mp::SplitOptions options) { return torch_mp::split(make_mlp(), two_stages(), options); };
  EXPECT_NE(
      error_of([&] { make(torch_mp::SplitOptions().chunks(0)); }).find("chunks = 0; expected >= 1"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { make(torch_mp::SplitOptions().chunks(2).schedule("zigzag")); })
          .find("schedule = 'zigzag'; expected 'gpipe', '1f1b' or 'zb_h1'"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { make(torch_mp::SplitOptions().chunks(2).schedule("zbv")); })
          .find("'interleaved_1f1b' and 'zbv', are torch_mp.split's in Python"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { make(torch_mp::SplitOptions().checkpoint("sometimes")); })
          .find("checkpoint = 'sometimes'; expected"),
      std::string::npos);
  auto piped = make(torch_mp::SplitOptions().chunks(8));
  EXPECT_NE(
      error_of([&] { piped->forward(torch::randn({4, 8})); })
          .find("chunks = 8 but the input batch holds 4 samples"),
      std::string::npos);
  auto loss_fn = [](const at::Tensor& output, const at::Tensor&) { return output; };
  EXPECT_NE(
      error_of([&] { piped->train_step(torch::randn({8, 8}), torch::randn({8, 4}), loss_fn); })
          .find("loss_fn returned a tensor of shape [1, 4]; expected a scalar"),
      std::string::npos);
}

// The timeline of a ZB-H1 step: one F, B and W per (stage, micro-batch), each stage's actions one
// after another in the schedule's order, a micro-batch's forward on stage s + 1 after its forward on
// stage s, and the receive waits inside the action that needed them.
TEST(PipelinedSplit, TimelineRecordsEveryActionAsItRan) {
  torch::manual_seed(0);
  auto piped = torch_mp::split(
      make_mlp(), {torch::kCPU, torch::kCPU, torch::kCPU},
      torch_mp::SplitOptions().balance({2, 2, 1}).chunks(4).schedule("zb_h1"));
  std::vector<torch_mp::pipeline::TimelineEvent> timeline{{9, "stale", 0, 0.0, 0.0}};
  piped->train_step(torch::randn({10, 8}), torch::randn({10, 4}), mse, &timeline);
  std::map<std::tuple<int64_t, std::string, int64_t>, torch_mp::pipeline::TimelineEvent> compute;
  std::vector<torch_mp::pipeline::TimelineEvent> waits;
  for (const auto& event : timeline) {
    EXPECT_LE(0.0, event.start);
    EXPECT_LE(event.start, event.end);
    if (event.kind == "recv-wait") {
      waits.push_back(event);
    } else {
      EXPECT_TRUE(compute.emplace(std::make_tuple(event.stage, event.kind, event.micro_batch), event).second);
    }
  }
  EXPECT_EQ(compute.size(), 3u * 3u * 4u);  // F, B, W of 3 stages x 4 micro-batches; nothing stale
  // Stages 1 and 2 receive each forward's input, stages 0 and 1 each backward's gradient.
  EXPECT_EQ(waits.size(), 2u * 4u + 2u * 4u);
  for (const auto& wait : waits) {
    const auto& f = compute.at({wait.stage, "F", wait.micro_batch});
    const auto& b = compute.at({wait.stage, "B", wait.micro_batch});
    EXPECT_TRUE((f.start <= wait.start && wait.end <= f.end) || (b.start <= wait.start && wait.end <= b.end));
  }
  for (int64_t stage = 0; stage < 3; ++stage) {
    double previous_end = 0.0;
    for (const auto& event : timeline) {
      if (event.stage == stage && event.kind != "recv-wait") {
        EXPECT_GE(event.start, previous_end);  // one action at a time on a stage
        previous_end = event.end;
      }
    }
    for (int64_t m = 0; m < 4; ++m) {
      const auto& f = compute.at({stage, "F", m});
      const auto& b = compute.at({stage, "B", m});
      EXPECT_LE(f.end, b.start);
      EXPECT_LE(b.end, compute.at({stage, "W", m}).start);
      if (stage > 0) {
        EXPECT_LE(compute.at({stage - 1, "F", m}).start, f.end);
      }
    }
  }
}

namespace {

// Halves the gradient in place and counts its calls: applied once per micro-batch it would halve
// the gradient several times.
struct HalveGrad : torch::autograd::PostAccumulateGradHook {
  explicit HalveGrad(int* calls) : calls(calls) {}
  void operator()(const torch::autograd::Variable& param) override {
    ++*calls;
    param.mutable_grad().mul_(0.5);
  }
  int* calls;
};

} // namespace

// Gradient hooks see what the dense model's see: a post-accumulate hook runs once per step, after
// the batch's gradient is complete; a hook on the gradient itself is refused with micro-batches.
TEST(PipelinedSplit, GradientHooksSeeTheWholeBatch) {
  torch::manual_seed(0);
  auto dense = make_mlp();
  auto piped = torch_mp::split(
      copy_of(dense),
      {torch::kCPU, torch::kCPU}, torch_mp::SplitOptions().chunks(4).schedule("zb_h1"));
  const auto input = torch::randn({10, 8});
  const auto target = torch::randn({10, 4});
  const torch_mp::LossFunction loss_fn = mse;
  int dense_calls = 0, piped_calls = 0;
  torch::autograd::impl::set_post_acc_grad_hooks(dense->parameters()[0], std::make_unique<HalveGrad>(&dense_calls));
  torch::autograd::impl::set_post_acc_grad_hooks(piped->parameters()[0], std::make_unique<HalveGrad>(&piped_calls));
  loss_fn(dense->forward(input), target).backward();
  piped->train_step(input, target, loss_fn);
  EXPECT_EQ(dense_calls, 1);
  EXPECT_EQ(piped_calls, 1);
  auto dense_params = dense->named_parameters();
  for (const auto& item : piped->named_parameters()) {
    EXPECT_TRUE(torch::allclose(item.value().grad(), dense_params[item.key()].grad(), 1e-5, 1e-6)) << item.key();
  }

  piped->parameters()[2].register_hook([](const at::Tensor& grad) { return grad.clamp(-1e-3, 1e-3); });
  const auto before = piped->parameters()[0].grad().clone();
  EXPECT_NE(
      error_of([&] { piped->train_step(input, target, loss_fn); })
          .find("has a gradient hook (Tensor::register_hook); with chunks = 4 it would see each micro-batch's part"),
      std::string::npos);
  EXPECT_TRUE(torch::equal(piped->parameters()[0].grad(), before));  // refused before anything ran
  EXPECT_EQ(piped_calls, 1);
}

// The stage threads compute with the caller's intra-op thread count (OpenMP's is per thread: a
// new thread would otherwise start a team of every core's threads).
TEST(PipelinedSplit, StageThreadsKeepTheCallersThreadCount) {
  const int before = at::get_num_threads();
  at::set_num_threads(1);
  std::atomic<int> most{0};
  auto probe = torch::nn::Functional([&](const at::Tensor& x) {
    int seen = at::get_num_threads();
    int current = most.load();
    while (seen > current && !most.compare_exchange_weak(current, seen)) {
    }
    return x;
  });
  auto model = torch::nn::Sequential(torch::nn::Linear(8, 8), probe, torch::nn::Linear(8, 4), probe);
  auto piped = torch_mp::split(model, two_stages(), torch_mp::SplitOptions().chunks(4).schedule("1f1b"));
  piped->train_step(torch::randn({8, 8}), torch::randn({8, 4}), mse);
  at::set_num_threads(before);
  EXPECT_EQ(most.load(), 1);
}
