// torch_mp::pipeline_parallel composed with torch_mp::tensor_parallel on a 2-D mesh (init_mesh,
// pp 2 x tp 2, threads over one store), the global gradient norm and clipping through a pipeline's
// groups, and the pipeline's forward on every rank: all against the dense C++ model.
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <set>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "dense.h"
#include "error_of.h"
#include "two_ranks.h"

namespace {

// Megatron's MLP pattern twice, then a replicated head; non-trivial random weights (seeded).
torch::nn::Sequential make_model() {
  torch::manual_seed(0);
  return torch::nn::Sequential(
      torch::nn::Linear(8, 16), torch::nn::Tanh(), torch::nn::Linear(16, 8), torch::nn::Tanh(),
      torch::nn::Linear(8, 16), torch::nn::GELU(), torch::nn::Linear(16, 8), torch::nn::Linear(8, 4));
}

const torch_mp::TensorParallelPlan kPlan = {{"[04]", "colwise"}, {"[26]", "rowwise"}};

// This tp rank's part of a dense tensor: the whole tensor when `local` has its shape, else the
// block along the one dim where they differ.
at::Tensor shard_of(const at::Tensor& dense, const at::Tensor& local, int64_t tp_rank) {
  for (int64_t d = 0; d < dense.dim(); ++d) {
    if (dense.size(d) != local.size(d)) {
      return dense.narrow(d, tp_rank * local.size(d), local.size(d));
    }
  }
  return dense;
}

// The dense model's numbers for two SGD steps on one batch (clipped to max_norm when > 0): each
// step's loss, the first step's gradients (after clipping) and norms, and the forward after the steps.
struct Dense {
  std::vector<double> losses;
  std::map<std::string, at::Tensor> grads;
  std::map<double, double> norms;
  at::Tensor output;
};

const double kInf = std::numeric_limits<double>::infinity();

Dense dense_reference(const torch::nn::Sequential& model, const at::Tensor& x, const at::Tensor& y,
                      double max_norm) {
  auto dense = copy_of(model);
  torch::optim::SGD sgd(dense->parameters(), 0.1);
  Dense out;
  for (int step = 0; step < 2; ++step) {
    sgd.zero_grad();
    auto loss = mse(dense->forward(x), y);
    loss.backward();
    out.losses.push_back(loss.item<double>());
    if (step == 0) {
      for (const double norm_type : {2.0, 1.0, kInf}) {
        out.norms[norm_type] = dense_norm(*dense, norm_type);
      }
    }
    if (max_norm > 0) {
      torch::nn::utils::clip_grad_norm_(dense->parameters(), max_norm);
    }
    if (step == 0) {
      for (const auto& item : dense->named_parameters()) {
        out.grads[item.key()] = item.value().grad().clone();
      }
    }
    sgd.step();
  }
  torch::NoGradGuard no_grad;
  out.output = dense->forward(x);
  return out;
}

// pp x tp ranks train the sharded pipeline two SGD steps; every rank's loss, gradients (its shard
// of the dense ones), norms and forward output are the dense model's.
void expect_dense(int64_t pp, int64_t tp, const std::string& schedule, std::vector<int64_t> balance, double max_norm) {
  SCOPED_TRACE(schedule + " pp " + std::to_string(pp) + " x tp " + std::to_string(tp) + " max_norm " +
               std::to_string(max_norm));
  const auto model = make_model();
  const auto x = torch::randn({6, 8});
  const auto y = torch::randn({6, 4});
  const auto dense = dense_reference(model, x, y, max_norm);
  std::mutex mutex;
  std::multiset<std::string> held;  // each dense parameter once per tp rank
  const auto name = "mesh_" + schedule + "_" + std::to_string(pp) + "x" + std::to_string(tp) + "_" +
                    std::to_string(balance.size()) + (max_norm > 0 ? "_clip" : "");
  torch_mp::testing::run_mesh(pp, tp, name, [&](const torch_mp::Mesh& mesh) {
    const auto where = "pp rank " + std::to_string(mesh.pp.rank) + " tp rank " + std::to_string(mesh.tp.rank);
    auto sharded = torch_mp::tensor_parallel(copy_of(model), kPlan, mesh.tp);
    auto pipe = torch_mp::pipeline_parallel(
        sharded, mesh.pp, torch_mp::PipelineOptions().schedule(schedule).chunks(3).balance(balance));
    torch::optim::SGD sgd(pipe->parameters(), 0.1);
    for (int step = 0; step < 2; ++step) {
      sgd.zero_grad();
      at::Tensor loss;
      if (max_norm > 0) {
        loss = pipe->train_step(x, y, mse, nullptr, max_norm);
      } else {
        loss = pipe->train_step(x, y, mse);
      }
      EXPECT_NEAR(loss.item<double>(), dense.losses[step], 1e-6) << where << " step " << step;
      if (step == 0) {
        if (max_norm == 0) {
          for (const double norm_type : {2.0, 1.0, kInf}) {
            const auto expected = dense.norms.at(norm_type);
            EXPECT_NEAR(torch_mp::get_total_norm(*pipe, norm_type).item<double>(), expected, 1e-5 * expected)
                << where << " norm_type " << norm_type;
          }
        } else {
          EXPECT_NEAR(torch_mp::get_total_norm(*pipe).item<double>(), max_norm, 1e-5) << where;
        }
        for (const auto& item : pipe->named_parameters()) {
          ASSERT_TRUE(item.value().grad().defined()) << item.key();
          const auto expected = shard_of(dense.grads.at(item.key()), item.value(), mesh.tp.rank);
          EXPECT_TRUE(torch::allclose(item.value().grad(), expected, 1e-4, 1e-6)) << where << ": " << item.key();
          std::lock_guard<std::mutex> lock(mutex);
          held.insert(item.key());
        }
      }
      sgd.step();
    }
    const auto output = pipe->forward(x);  // on every rank
    ASSERT_TRUE(output.defined()) << where;
    EXPECT_TRUE(torch::allclose(output, dense.output, 1e-4, 1e-6)) << where;
  });
  std::multiset<std::string> expected;
  for (int64_t r = 0; r < tp; ++r) {
    for (const auto& item : model->named_parameters()) {
      expected.insert(item.key());
    }
  }
  EXPECT_EQ(held, expected);
}

} // namespace

TEST(Mesh, PipelineOfTensorParallelStagesMatchesDenseOnFourRanks) {
  at::set_num_threads(1);
  // Stage boundaries on replicated activations ({4, 4}) and inside a colwise -> rowwise pair, where
  // each tp rank sends its shard to its peer ({2, 6}).
  for (const auto* schedule : {"gpipe", "1f1b", "zb_h1"}) {
    expect_dense(2, 2, schedule, {4, 4}, 0);
  }
  expect_dense(2, 2, "1f1b", {2, 6}, 0);
  expect_dense(2, 2, "zbv", {2, 2, 2, 2}, 0);
}

// The global norm over a pipeline's groups (summed over pp, shards over tp) and train_step's
// max_norm: every rank clips by the dense model's norm.
TEST(Mesh, ClippingThroughThePipelinesGroups) {
  at::set_num_threads(1);
  expect_dense(2, 1, "1f1b", {}, 0);        // pipeline only: the norm summed over its ranks
  expect_dense(2, 1, "1f1b", {}, 0.05);     // train_step's max_norm
  expect_dense(2, 2, "1f1b", {4, 4}, 0.05); // pp x tp
  expect_dense(1, 2, "1f1b", {}, 0.05);     // tensor parallel stages of a one-rank pipeline
}

TEST(Mesh, InitMeshChecksItsSizes) {
  torch_mp::ProcessGroupOptions options;
  options.rank = 0;
  options.world_size = 4;
  EXPECT_NE(error_of([&] { torch_mp::init_mesh(3, 2, options); })
                .find("init_mesh: pp=3 x tp=2 = 6 ranks but the world has 4; expected pp * tp == world size"),
            std::string::npos);
  EXPECT_NE(error_of([&] { torch_mp::init_mesh(0, 4, options); }).find("init_mesh: pp = 0; expected an int >= 1"),
            std::string::npos);
}

// The layout: tensor parallel innermost, rank = pp_index * tp + tp_index.
TEST(Mesh, TensorParallelIsInnermost) {
  std::mutex mutex;
  std::map<int64_t, std::pair<int64_t, int64_t>> seen;  // world rank -> (pp rank, tp rank)
  torch_mp::testing::run_mesh(2, 2, "mesh_layout", [&](const torch_mp::Mesh& mesh) {
    EXPECT_EQ(mesh.pp.size, 2);
    EXPECT_EQ(mesh.tp.size, 2);
    // Which world ranks share this rank's tp group: their world ranks summed over the group.
    const auto world = mesh.pp.rank * 2 + mesh.tp.rank;
    auto tp_sum = torch_mp::primitives::all_reduce(torch::tensor({world}), "sum", mesh.tp);
    auto pp_sum = torch_mp::primitives::all_reduce(torch::tensor({world}), "sum", mesh.pp);
    EXPECT_EQ(tp_sum.item<int64_t>(), mesh.pp.rank == 0 ? 0 + 1 : 2 + 3);
    EXPECT_EQ(pp_sum.item<int64_t>(), mesh.tp.rank == 0 ? 0 + 2 : 1 + 3);
    std::lock_guard<std::mutex> lock(mutex);
    seen[world] = {mesh.pp.rank, mesh.tp.rank};
  });
  EXPECT_EQ(seen.size(), 4u);
}

// --- bad input on the mesh: c10::ValueError before the first message -------------------------

TEST(Mesh, TensorParallelGroupThatDoesNotDivideTheFeatures) {
  const torch_mp::Group tp{"unused", 3, 1};  // checked before any group is looked up
  const auto message = error_of([&] { torch_mp::tensor_parallel(make_model(), kPlan, tp); });
  EXPECT_NE(message.find("out_features 16 is not divisible by the group size 3; expected a multiple of 3"),
            std::string::npos)
      << message;
}

// The tp ranks of one stage pass different chunks: the pipeline's group agrees, its tp group does not.
TEST(Mesh, OptionsThatDifferAcrossTheTensorParallelGroup) {
  const auto model = make_model();
  torch_mp::testing::run_mesh(2, 2, "mesh_differ", [&](const torch_mp::Mesh& mesh) {
    auto sharded = torch_mp::tensor_parallel(copy_of(model), kPlan, mesh.tp);
    const auto message = error_of([&] {
      torch_mp::pipeline_parallel(sharded, mesh.pp, torch_mp::PipelineOptions().chunks(2 + mesh.tp.rank));
    });
    EXPECT_NE(message.find("the ranks disagree (chunks: rank 0 2, rank 1 3); expected every rank to call "
                           "pipeline_parallel with the same options and the same Sequential (compared over the "
                           "tensor-parallel group '" + mesh.tp.name + "')"),
              std::string::npos)
        << message;
  });
}

TEST(Mesh, MaxNormThatDiffersBetweenRanksOrIsNegative) {
  const auto model = make_model();
  torch_mp::testing::run_two_ranks("mesh_max_norm", [&](const torch_mp::Group& group) {
    auto pipe = torch_mp::pipeline_parallel(copy_of(model), group);
    auto message = error_of([&] {
      pipe->train_step(torch::randn({4, 8}), torch::randn({4, 4}), mse, nullptr, group.rank ? 1.0 : 0.5);
    });
    EXPECT_NE(message.find("max_norm: rank 0 0.5, rank 1 1"), std::string::npos) << message;
    message = error_of([&] { pipe->train_step(torch::randn({4, 8}), torch::randn({4, 4}), mse, nullptr, -1.0); });
    EXPECT_NE(message.find("train_step got max_norm = -1; expected a number >= 0"), std::string::npos) << message;
    // Nothing moved: the pipeline still works.
    EXPECT_NO_THROW(pipe->train_step(torch::randn({4, 8}), torch::randn({4, 4}), mse, nullptr, 1.0));
  });
}
