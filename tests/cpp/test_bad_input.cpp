// Bad input to the C++ API, as a table: each case names the c10 error type it must raise (ValueError,
// TypeError and IndexError become Python's) and the substrings its message must hold. Then a
// collective nobody answers: a CollectiveError naming the op, the group and the rank.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <optional>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "two_ranks.h"

namespace {

enum class Kind { Value, Type, Index };

struct Case {
  std::string name;
  std::function<void()> call;
  Kind kind;
  std::vector<std::string> substrings;
};

bool is_kind(const c10::Error& error, Kind kind) {
  switch (kind) {
    case Kind::Value:
      return dynamic_cast<const c10::ValueError*>(&error) != nullptr;
    case Kind::Type:
      return dynamic_cast<const c10::TypeError*>(&error) != nullptr;
    case Kind::Index:
      return dynamic_cast<const c10::IndexError*>(&error) != nullptr;
  }
  return false;
}

void expect_error(const Case& entry) {
  try {
    entry.call();
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    EXPECT_TRUE(is_kind(error, entry.kind)) << entry.name << ": wrong error type for: " << message;
    for (const auto& expected : entry.substrings) {
      EXPECT_NE(message.find(expected), std::string::npos)
          << entry.name << ": '" << expected << "' is not in: " << message;
    }
    return;
  }
  ADD_FAILURE() << entry.name << ": no error";
}

at::Tensor x(at::IntArrayRef shape = {2, 4}) {
  return torch::randn(shape);
}

const torch_mp::Group kMissing{"missing", 2, 0};
const torch_mp::Group kSingle = torch_mp::Group::single();

torch::nn::Sequential mlp() {
  return torch::nn::Sequential(torch::nn::Linear(4, 8), torch::nn::ReLU(), torch::nn::Linear(8, 4));
}

// --- checkpoints from strangers: each case writes its own bad checkpoint, then loads it.

namespace fs = std::filesystem;
using Json = nlohmann::json;

// A folder for the bad checkpoints, removed when the tests end.
const fs::path& bad_files() {
  static const struct Folder {
    fs::path path = fs::temp_directory_path() / ("torch_mp_bad_input_" + std::to_string(::getpid()));
    Folder() {
      fs::remove_all(path);
      fs::create_directories(path);
    }
    ~Folder() {
      fs::remove_all(path);
    }
  } folder;
  return folder.path;
}

std::string read_text(const fs::path& path) {
  std::ifstream stream(path, std::ios::binary);
  std::stringstream text;
  text << stream.rdbuf();
  return text.str();
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
}

// A torch_mp::save checkpoint of mlp() at bad_files()/name whose index is edit(index, outside):
// `outside` is a valid checkpoint beside it, which a name leaving the folder would reach.
std::string bad_checkpoint(const std::string& name, const std::function<std::string(Json, const fs::path&)>& edit) {
  const fs::path outside = bad_files() / "outside", path = bad_files() / name;
  if (!fs::exists(outside)) {
    torch_mp::save(*mlp(), outside.string());
  }
  torch_mp::save(*mlp(), path.string());
  const fs::path index = path / "torch_mp_checkpoint.json";
  write_text(index, edit(Json::parse(read_text(index)), outside));
  return path.string();
}

// Every piece of `index` in the file `file`.
std::string with_file(Json index, const std::string& file) {
  for (auto& entry : index["tensors"]) {
    entry["pieces"][0]["file"] = file;
  }
  return index.dump();
}

// A checkpoint of mlp() whose safetensors file holds `header` (its length: `length` if given), then `data`.
std::string bad_rank_file(const std::string& name, const std::string& header, const std::string& data,
                          std::optional<uint64_t> length = std::nullopt) {
  const auto path = bad_checkpoint(name, [](Json index, const fs::path&) { return index.dump(); });
  const uint64_t claimed = length.value_or(header.size());
  write_text(fs::path(path) / "rank-00000-of-00001.safetensors",
             std::string(reinterpret_cast<const char*>(&claimed), sizeof(claimed)) + header + data);
  return path;
}

void load_into_mlp(const std::string& path) {
  auto model = mlp();
  torch_mp::load(*model, path);
}

std::vector<Case> checkpoint_cases() {
  const std::string offsets_1 = R"({"0.bias":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})";
  return {
      {"load/piece file with ..", [] {
         load_into_mlp(bad_checkpoint("dotdot", [](Json index, const fs::path&) {
           return with_file(index, "../outside/rank-00000-of-00001.safetensors");
         }));
       }, Kind::Value, {"torch_mp::load: ", "dotdot/torch_mp_checkpoint.json: tensor '0.bias' piece 0 names the file "
                        "\"../outside/rank-00000-of-00001.safetensors\"; expected a relative path inside",
                        "(no absolute path, no '..')"}},
      {"load/piece file absolute", [] {
         load_into_mlp(bad_checkpoint("absolute", [](Json index, const fs::path& outside) {
           return with_file(index, (outside / "rank-00000-of-00001.safetensors").string());
         }));
       }, Kind::Value, {"piece 0 names the file \"/", "outside/rank-00000-of-00001.safetensors\"; expected a relative path"}},
      {"load/piece file a symlink out of the folder", [] {
         load_into_mlp(bad_checkpoint("symlink", [](Json index, const fs::path& outside) {
           fs::create_symlink(outside / "rank-00000-of-00001.safetensors", bad_files() / "symlink" / "link.safetensors");
           return with_file(index, "link.safetensors");
         }));
       }, Kind::Value, {"piece 0 names the file \"link.safetensors\", which resolves to ",
                        "outside the checkpoint folder", "expected a file inside it"}},
      {"load/index not JSON", [] {
         load_into_mlp(bad_checkpoint("index_not_json", [](Json, const fs::path&) { return "{not json"; }));
       }, Kind::Value, {"index_not_json/torch_mp_checkpoint.json is not valid JSON: [json.exception.parse_error"}},
      {"load/piece bounds beyond the shape", [] {
         load_into_mlp(bad_checkpoint("bounds", [](Json index, const fs::path&) {
           index["tensors"]["0.weight"]["dim"] = 0;
           index["tensors"]["0.weight"]["pieces"][0]["bounds"] = Json::array({Json::array({0, 99})});
           return index.dump();
         }));
       }, Kind::Value, {"bounds/torch_mp_checkpoint.json: tensor '0.weight' piece 0 has bounds [[0,99]]; expected null "
                        "for a whole tensor, else [start, stop] ranges within [0, 8]"}},
      {"load/shape 2^40 x 2^40 x 2^40 in the index", [] {
         load_into_mlp(bad_checkpoint("index_huge_shape", [](Json index, const fs::path&) {
           index["tensors"]["0.weight"]["shape"] = Json::array({1ULL << 40, 1ULL << 40, 1ULL << 40});
           return index.dump();
         }));
       }, Kind::Value, {"tensor '0.weight' has dtype \"F32\" and shape [1099511627776,1099511627776,1099511627776]; "
                        "expected a safetensors dtype and sizes >= 0 that do not overflow"}},
      {"load/header claims 10^12 bytes", [] { load_into_mlp(bad_rank_file("huge_header", "{}", "", 1000000000000ULL)); },
       Kind::Value, {"huge_header/rank-00000-of-00001.safetensors claims a header of 1000000000000 bytes but has 2"}},
      {"load/negative data_offsets", [offsets_1] { load_into_mlp(bad_rank_file("negative_offsets", offsets_1, "1234")); },
       Kind::Value, {"negative_offsets/rank-00000-of-00001.safetensors: tensor '0.bias' has data_offsets that are not "
                     "[begin, end] with 0 <= begin"}},
      {"load/header not JSON", [] { load_into_mlp(bad_rank_file("header_not_json", "not json", "")); }, Kind::Value,
       {"header_not_json/rank-00000-of-00001.safetensors is not valid JSON"}},
      {"load/shape 2^40 x 2^40 in the header", [] {
         load_into_mlp(bad_rank_file("huge_shape", R"({"0.bias":{"dtype":"F32","shape":[1099511627776,1099511627776],)"
                                     R"("data_offsets":[0,4]}})", "1234"));
       }, Kind::Value, {"huge_shape/rank-00000-of-00001.safetensors: tensor '0.bias' has a shape whose byte size overflows"}},
      {"load/truncated data", [] {
         load_into_mlp(bad_rank_file("truncated", R"({"0.bias":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", "1234"));
       }, Kind::Value, {"truncated/rank-00000-of-00001.safetensors: tensor '0.bias' has data_offsets [0, 16) for 16 bytes "
                        "in a data section of 4"}},
      {"load/data_offsets leaving a gap", [] {
         load_into_mlp(bad_rank_file("gap", R"({"0.bias":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", "12345678"));
       }, Kind::Value, {"gap/rank-00000-of-00001.safetensors: tensor data at byte 4 of the data section; expected the "
                        "next tensor at byte 0"}},
  };
}

std::vector<Case> cases() {
  using torch_mp::nn::ColumnParallelLinear;
  using torch_mp::nn::ColumnParallelLinearOptions;
  using torch_mp::nn::RowParallelLinear;
  using torch_mp::nn::RowParallelLinearOptions;
  using torch_mp::nn::VocabParallelEmbedding;
  using torch_mp::nn::VocabParallelEmbeddingOptions;
  using torch_mp::nn::VocabParallelCrossEntropyLoss;
  using torch_mp::nn::VocabParallelCrossEntropyLossOptions;
  return {
      // --- ops
      {"to_device/unavailable device", [] { torch_mp::to_device(x(), torch::Device("cuda:99")); }, Kind::Value,
       {"torch_mp.to_device(device=...): device 'cuda:99' is not available"}},
      {"copy_to_tp/missing group", [] { torch_mp::copy_to_tp(x(), kMissing); }, Kind::Value,
       {"torch_mp.copy_to_tp: no process group named 'missing' is registered"}},
      {"reduce_from_tp/missing group", [] { torch_mp::reduce_from_tp(x(), kMissing); }, Kind::Value,
       {"no process group named 'missing'", "(never made, or destroyed)"}},
      {"gather_from_tp/dim out of range", [] { torch_mp::gather_from_tp(x(), 5, kSingle); }, Kind::Index,
       {"torch_mp.gather_from_tp: dim 5 is out of range for an input with 2 dims", "[-2, 1]"}},
      {"scatter_to_tp/0-dim input", [] { torch_mp::scatter_to_tp(torch::tensor(1.0), -1, kSingle); }, Kind::Index,
       {"torch_mp.scatter_to_tp: dim -1", "expected an input with at least one dim"}},
      {"reduce_scatter_to_sp/indivisible", [] { torch_mp::reduce_scatter_to_sp(x({3, 4}), 0, kMissing); },
       Kind::Value, {"input size 3 along dim 0 is not divisible by the group size 2; expected a multiple of 2"}},
      {"column_parallel_linear/weight a vector",
       [] { torch_mp::column_parallel_linear(x(), x({6}), std::nullopt, false, kSingle); }, Kind::Value,
       {"torch_mp.column_parallel_linear: weight has shape [6]", "expected a matrix [out_features / group size"}},
      {"column_parallel_linear/features differ",
       [] { torch_mp::column_parallel_linear(x(), x({6, 5}), std::nullopt, false, kSingle); }, Kind::Value,
       {"input has 4 features (its last dim) but weight has shape [6, 5]"}},
      {"column_parallel_linear/bias shape", [] { torch_mp::column_parallel_linear(x(), x({6, 4}), x({5}), false, kSingle); },
       Kind::Value, {"bias has shape [5]", "expected [6], one entry per row of weight"}},
      {"column_parallel_linear/weight dtype",
       [] { torch_mp::column_parallel_linear(x(), x({6, 4}).to(torch::kDouble), std::nullopt, false, kSingle); },
       Kind::Type, {"weight has dtype Double but input has dtype Float"}},
      {"row_parallel_linear/features differ",
       [] { torch_mp::row_parallel_linear(x(), x({6, 3}), std::nullopt, true, kSingle); }, Kind::Value,
       {"torch_mp.row_parallel_linear: input has 4 features", "expected weight [out_features, in_features / group size]"}},
      {"vocab_parallel_embedding/float ids", [] { torch_mp::vocab_parallel_embedding(x({3}), x({10, 4}), 0, kSingle); },
       Kind::Type, {"input has dtype Float; expected integer indices"}},
      {"vocab_parallel_cross_entropy/shapes differ",
       [] { torch_mp::vocab_parallel_cross_entropy(x({3, 10}), torch::zeros({4}, torch::kLong), 0, -100, kSingle); },
       Kind::Value, {"logits of shape [3, 10] and target of shape [4]"}},
      {"vocab_parallel_cross_entropy/float target",
       [] { torch_mp::vocab_parallel_cross_entropy(x({3, 10}), x({3}), 0, -100, kSingle); }, Kind::Type,
       {"target has dtype Float; expected integer class indices"}},
      {"primitives::all_reduce/reduce_op", [] { torch_mp::primitives::all_reduce(x(), "mean", kSingle); },
       Kind::Value, {"reduce_op 'mean'; expected sum, max, min or product"}},
      {"primitives::shard/group size 0", [] { torch_mp::primitives::shard(x(), 0, torch_mp::Group{"", 0, 0}); },
       Kind::Value, {"torch_mp.shard: group_size is 0; expected at least 1"}},
      // --- layers
      {"ColumnParallelLinear/indivisible", [] { ColumnParallelLinear(ColumnParallelLinearOptions(4, 6).group({"g", 4, 0})); },
       Kind::Value, {"ColumnParallelLinear: out_features 6 is not divisible by the group size 4"}},
      {"ColumnParallelLinear/negative in_features", [] { ColumnParallelLinear(ColumnParallelLinearOptions(-1, 6)); },
       Kind::Value, {"ColumnParallelLinear: in_features is -1; expected a size >= 0"}},
      {"ColumnParallelLinear/rank outside the group",
       [] { ColumnParallelLinear(ColumnParallelLinearOptions(4, 6).group({"g", 2, 5})); }, Kind::Value,
       {"ColumnParallelLinear: group 'g' has size 2 and rank 5; expected size >= 1 and 0 <= rank < size"}},
      {"ColumnParallelLinear/group size 0", [] { ColumnParallelLinear(ColumnParallelLinearOptions(4, 6).group({"g", 0, 0})); },
       Kind::Value, {"group 'g' has size 0"}},
      {"ColumnParallelLinear/wrong input features", [] { ColumnParallelLinear(ColumnParallelLinearOptions(4, 6))(x({2, 5})); },
       Kind::Value, {"input has 5 features"}},
      {"RowParallelLinear/negative out_features", [] { RowParallelLinear(RowParallelLinearOptions(4, -2)); },
       Kind::Value, {"RowParallelLinear: out_features is -2; expected a size >= 0"}},
      {"VocabParallelEmbedding/negative embedding_dim",
       [] { VocabParallelEmbedding(VocabParallelEmbeddingOptions(10, -4)); }, Kind::Value,
       {"VocabParallelEmbedding: embedding_dim is -4; expected a size >= 0"}},
      {"VocabParallelCrossEntropyLoss/reduction",
       [] { VocabParallelCrossEntropyLoss(VocabParallelCrossEntropyLossOptions().reduction("avg")); }, Kind::Value,
       {"reduction 'avg'; expected 'mean', 'sum' or 'none'"}},
      {"VocabParallelCrossEntropyLoss/0-dim logits",
       [] { VocabParallelCrossEntropyLoss()->forward(torch::tensor(1.0), torch::tensor(0)); }, Kind::Value,
       {"logits of shape [] and target of shape []"}},
      // --- groups
      {"Group::named/missing", [] { torch_mp::Group::named("missing"); }, Kind::Value,
       {"Group::named: no process group named 'missing'"}},
      {"init_process_group/backend", [] {
         torch_mp::ProcessGroupOptions options;
         options.backend = "mpi";
         options.rank = 0;
         options.world_size = 1;
         options.store = c10::make_intrusive<c10d::HashStore>();
         options.group_name = "bad_backend";
         torch_mp::init_process_group(options);
       }, Kind::Value, {"init_process_group: backend 'mpi' is not available; expected 'gloo'"}},
      {"init_process_group/rank", [] {
         torch_mp::ProcessGroupOptions options;
         options.rank = 3;
         options.world_size = 2;
         torch_mp::init_process_group(options);
       }, Kind::Value, {"init_process_group: rank 3 and world size 2; expected 0 <= rank < world size"}},
      {"destroy_process_group/unknown", [] { torch_mp::destroy_process_group(kMissing); }, Kind::Value,
       {"destroy_process_group: no group named 'missing' was made by torch_mp::init_process_group"}},
      // --- split
      {"split/null Sequential", [] { torch_mp::split(torch::nn::Sequential(nullptr), {torch::kCPU}); }, Kind::Value,
       {"split: the Sequential is null; expected a module to split"}},
      {"split/no devices", [] { torch_mp::split(mlp(), {}); }, Kind::Value,
       {"split: no devices given; expected at least one device"}},
      {"split/unavailable device", [] { torch_mp::split(mlp(), {torch::kCPU, torch::Device("cuda:99")}); },
       Kind::Value, {"split(devices=...): device 'cuda:99' is not available"}},
      {"split/balance", [] { torch_mp::split(mlp(), {torch::kCPU, torch::kCPU}, torch_mp::SplitOptions().balance({1, 1})); },
       Kind::Value, {"split: balance [1, 1] adds up to 2 layers but the model has 3 layers"}},
      {"split/max_memory entries",
       [] { torch_mp::split(mlp(), {torch::kCPU, torch::kCPU}, torch_mp::SplitOptions().max_memory({1 << 20})); },
       Kind::Value, {"split: max_memory has 1 entries but there are 2 devices"}},
      {"split/max_memory too small",
       [] { torch_mp::split(mlp(), {torch::kCPU, torch::kCPU}, torch_mp::SplitOptions().max_memory({8, 8})); },
       Kind::Value, {"cannot hold the model"}},
      // --- tensor_parallel
      {"tensor_parallel/null Sequential", [] { torch_mp::tensor_parallel(torch::nn::Sequential(nullptr), {}, kSingle); },
       Kind::Value, {"tensor_parallel: the Sequential is null"}},
      {"tensor_parallel/pattern matches nothing", [] { torch_mp::tensor_parallel(mlp(), {{"9", "colwise"}}, kSingle); },
       Kind::Value, {"tensor_parallel: plan pattern '9' matches no module"}},
      {"tensor_parallel/unknown style", [] { torch_mp::tensor_parallel(mlp(), {{"0", "diagonal"}}, kSingle); },
       Kind::Value, {"tensor_parallel: style 'diagonal' for '0'; expected colwise, rowwise, vocab or replicate"}},
      {"tensor_parallel/style for another layer", [] { torch_mp::tensor_parallel(mlp(), {{"0", "vocab"}}, kSingle); },
       Kind::Value, {"style 'vocab' for '0', a torch::nn::LinearImpl; expected a torch::nn::Embedding"}},
      {"tensor_parallel/indivisible", [] { torch_mp::tensor_parallel(mlp(), {{"0", "colwise"}}, {"g", 3, 0}); },
       Kind::Value, {"out_features 8 is not divisible by the group size 3"}},
  };
}

} // namespace

TEST(BadInput, EveryCaseRaisesANamedError) {
  for (const auto& entry : cases()) {
    SCOPED_TRACE(entry.name);
    expect_error(entry);
  }
}

TEST(BadInput, CheckpointsFromStrangersRaiseNamedErrors) {
  for (const auto& entry : checkpoint_cases()) {
    SCOPED_TRACE(entry.name);
    expect_error(entry);
  }
}

// Rank 1 never reaches the all-reduce: rank 0 fails after the group's timeout, naming who waited.
TEST(BadInput, UnansweredCollectiveIsACollectiveError) {
  std::promise<void> rank0_done;
  auto done = rank0_done.get_future().share();
  torch_mp::testing::run_two_ranks(
      "unanswered",
      [&](const torch_mp::Group& group) {
        if (group.rank == 1) {
          done.wait();
          return;
        }
        try {
          torch_mp::reduce_from_tp(x(), group);
          ADD_FAILURE() << "the all-reduce completed without rank 1";
        } catch (const torch_mp::CollectiveError& error) {
          EXPECT_NE(
              std::string(error.what()).find("torch_mp.reduce_from_tp: all_reduce on group 'unanswered_rank0' "
                                             "(rank 0 of 2) got no answer within 1.0 s: a peer rank has died or "
                                             "did not reach this collective"),
              std::string::npos)
              << error.what();
        }
        rank0_done.set_value();
      },
      std::chrono::seconds(1));
}
