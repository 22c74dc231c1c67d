#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "error_of.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>

namespace {

namespace fs = std::filesystem;

torch::nn::Sequential make_mlp(int64_t out = 4) {
  return torch::nn::Sequential(
      torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::BatchNorm1d(16), torch::nn::Linear(16, out));
}

// A fresh folder per test, removed at the end.
struct TempFolder {
  fs::path path = fs::temp_directory_path() /
      ("torch_mp_checkpoint_" + std::to_string(::getpid()) + "_" +
       ::testing::UnitTest::GetInstance()->current_test_info()->name());
  TempFolder() {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempFolder() {
    fs::remove_all(path);
  }
};

std::vector<std::string> entries(const fs::path& folder) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(folder)) {
    names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

} // namespace

TEST(Checkpoint, RoundTripWithRandomStateAndReplacement) {
  TempFolder folder;
  const auto path = (folder.path / "ckpt").string();
  torch::manual_seed(0);
  auto model = make_mlp();
  model->forward(torch::randn({4, 8})); // BatchNorm's running statistics: buffers that must round-trip
  torch_mp::save(*model, path);
  auto expected_draw = torch::rand({3});

  torch::manual_seed(1);
  auto other = make_mlp();
  torch_mp::load(*other, path);
  EXPECT_TRUE(torch::equal(torch::rand({3}), expected_draw)); // the random state came back
  auto saved = model->named_parameters(), loaded = other->named_parameters();
  for (const auto& item : saved) {
    EXPECT_TRUE(torch::equal(item.value(), loaded[item.key()])) << item.key();
  }
  auto saved_buffers = model->named_buffers(), loaded_buffers = other->named_buffers();
  for (const auto& item : saved_buffers) {
    EXPECT_TRUE(torch::equal(item.value(), loaded_buffers[item.key()])) << item.key();
  }

  // A second save replaces the first, through a temporary folder that does not stay behind.
  torch_mp::save(*other, path);
  EXPECT_EQ(entries(path), (std::vector<std::string>{"rank-00000-of-00001.safetensors", "torch_mp_checkpoint.json"}));
  EXPECT_EQ(entries(folder.path), std::vector<std::string>{"ckpt"});
}

TEST(Checkpoint, FallsBackToTheCheckpointASaveSetAside) {
  TempFolder folder;
  const auto path = (folder.path / "ckpt").string();
  auto model = make_mlp();
  torch_mp::save(*model, path);
  fs::rename(path, path + ".old"); // a crash between the save's two renames
  fs::create_directories(path + ".incomplete");
  auto other = make_mlp();
  torch_mp::load(*other, path);
  EXPECT_TRUE(torch::equal(model[0]->as<torch::nn::Linear>()->weight, other[0]->as<torch::nn::Linear>()->weight));
}

TEST(Checkpoint, ErrorsNameWhatIsWrong) {
  TempFolder folder;
  const auto path = (folder.path / "ckpt").string();
  auto model = make_mlp();
  EXPECT_NE(error_of([&] { torch_mp::load(*model, path); }).find("no complete checkpoint found"), std::string::npos);
  torch_mp::save(*model, path);

  auto wider = make_mlp(5);
  auto message = error_of([&] { torch_mp::load(*wider, path); });
  EXPECT_NE(message.find("'3.weight' has shape [4, 16] in the checkpoint"), std::string::npos) << message;
  EXPECT_NE(message.find("the module expects [5, 16]"), std::string::npos) << message;

  auto smaller = torch::nn::Sequential(torch::nn::Linear(8, 16));
  message = error_of([&] { torch_mp::load(*smaller, path); });
  EXPECT_NE(message.find("holds keys ['2.bias', '2.num_batches_tracked'"), std::string::npos) << message;

  // Flip one byte of the last tensor (the random state): its checksum no longer matches.
  const auto file = fs::path(path) / "rank-00000-of-00001.safetensors";
  std::fstream stream(file, std::ios::in | std::ios::out | std::ios::binary);
  stream.seekg(-1, std::ios::end);
  char last = 0;
  stream.read(&last, 1);
  stream.seekp(-1, std::ios::end);
  last ^= 0x40;
  stream.write(&last, 1);
  stream.close();
  message = error_of([&] { torch_mp::load(*model, path); });
  EXPECT_NE(message.find("checksum mismatch in"), std::string::npos) << message;
  EXPECT_NE(message.find("rng/cpu/0"), std::string::npos) << message;

  std::ofstream(folder.path / "file") << "not a checkpoint";
  message = error_of([&] { torch_mp::save(*model, (folder.path / "file").string()); });
  EXPECT_NE(message.find("exists and is not a torch_mp checkpoint"), std::string::npos) << message;
}
