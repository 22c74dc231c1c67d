#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

#include "error_of.h"
#include "two_ranks.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
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

// Every parameter and buffer of `loaded` equals `saved`'s.
void expect_same_state(const torch::nn::Module& saved, const torch::nn::Module& loaded) {
  auto parameters = loaded.named_parameters(), buffers = loaded.named_buffers();
  for (const auto& item : saved.named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), parameters[item.key()])) << item.key();
  }
  for (const auto& item : saved.named_buffers()) {
    EXPECT_TRUE(torch::equal(item.value(), buffers[item.key()])) << item.key();
  }
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
  expect_same_state(*model, *other);

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

// Flips the last byte of `file`.
void flip_last_byte(const fs::path& file) {
  std::fstream stream(file, std::ios::in | std::ios::out | std::ios::binary);
  stream.seekg(-1, std::ios::end);
  char last = 0;
  stream.read(&last, 1);
  stream.seekp(-1, std::ios::end);
  last ^= 0x01;
  stream.write(&last, 1);
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
  flip_last_byte(fs::path(path) / "rank-00000-of-00001.safetensors");
  message = error_of([&] { torch_mp::load(*model, path); });
  EXPECT_NE(message.find("checksum mismatch in"), std::string::npos) << message;
  EXPECT_NE(message.find("rng/cpu/0"), std::string::npos) << message;

  std::ofstream(folder.path / "file") << "not a checkpoint";
  message = error_of([&] { torch_mp::save(*model, (folder.path / "file").string()); });
  EXPECT_NE(message.find("exists and is not a torch_mp checkpoint"), std::string::npos) << message;
}

// A checkpoint two tensor-parallel ranks wrote: '0.weight' cut by rows, rank 1's rows alone in its
// file. torch_mp::load joins the pieces; one flipped byte of rank 1's shard is a checksum error that
// names the file and the tensor, as for a tensor stored whole. The checkpoint is written by Python
// ($TORCH_MP_PYTHON, else python3), with torch_mp's own safetensors writer and an index in the format.
TEST(Checkpoint, CorruptedShardOfOneRankIsAChecksumError) {
  TempFolder folder;
  const fs::path script = folder.path / "shards.py";
  std::ofstream(script)
      << "import json, os, sys, torch\n"
         "from torch import nn\n"
         "from torch_mp._checkpoint.safetensors import dtype_name, write_file\n"
         "torch.manual_seed(3)\n"
         "model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4))\n"
         "state = {k: v.contiguous() for k, v in model.state_dict().items()}\n"
         "out = os.path.join(sys.argv[1], 'ckpt')\n"
         "os.makedirs(out)\n"
         "files = ['rank-00000-of-00002.safetensors', 'rank-00001-of-00002.safetensors']\n"
         "held = [[(k, v) for k, v in state.items() if k != '0.weight'] + [('0.weight', state['0.weight'][:8])],\n"
         "        [('0.weight', state['0.weight'][8:].contiguous())]]\n"
         "crcs = [write_file(os.path.join(out, f), h) for f, h in zip(files, held)]\n"
         "def entry(k, pieces, dim=None):\n"
         "    return {'dtype': dtype_name(state[k].dtype), 'shape': list(state[k].shape), 'dim': dim, 'pieces': pieces}\n"
         "tensors = {k: entry(k, [{'file': files[0], 'key': k, 'bounds': None, 'crc32': crcs[0][k]}])\n"
         "           for k in state if k != '0.weight'}\n"
         "tensors['0.weight'] = entry('0.weight', [{'file': files[r], 'key': '0.weight', 'bounds': [b],\n"
         "                                          'crc32': crcs[r]['0.weight']} for r, b in ((0, [0, 8]), (1, [8, 16]))], 0)\n"
         "index = {'format': 'torch_mp.checkpoint', 'version': 1, 'world_size': 2, 'model': list(state),\n"
         "         'tensors': tensors, 'optimizer': None, 'extra': {}}\n"
         "json.dump(index, open(os.path.join(out, 'torch_mp_checkpoint.json'), 'w'))\n"
         "with open(os.path.join(sys.argv[1], 'weight'), 'wb') as f:\n"
         "    f.write(state['0.weight'].numpy().tobytes())\n";
  const char* python = std::getenv("TORCH_MP_PYTHON");
  const std::string command =
      std::string(python ? python : "python3") + " " + script.string() + " " + folder.path.string();
  ASSERT_EQ(std::system(command.c_str()), 0) << "failed: " << command;
  const auto path = (folder.path / "ckpt").string();

  auto model = make_mlp();
  torch_mp::load(*model, path);
  std::ifstream stream(folder.path / "weight", std::ios::binary);
  const std::string bytes{std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>()};
  const auto weight = model[0]->as<torch::nn::Linear>()->weight.contiguous();
  ASSERT_EQ(bytes.size(), weight.nbytes());
  EXPECT_EQ(std::memcmp(bytes.data(), weight.data_ptr(), bytes.size()), 0); // both pieces, joined

  flip_last_byte(fs::path(path) / "rank-00001-of-00002.safetensors"); // in rank 1's rows of 0.weight
  const auto message = error_of([&] { torch_mp::load(*model, path); });
  EXPECT_NE(message.find("checksum mismatch in"), std::string::npos) << message;
  EXPECT_NE(message.find("rank-00001-of-00002.safetensors\" for '0.weight'"), std::string::npos) << message;
}

// Every parameter and buffer of `module` as raw bytes, one file each under `folder`: what the other
// language compares its loaded tensors with, byte for byte, without torch_mp's format in between.
void dump_raw(const torch::nn::Module& module, const fs::path& folder) {
  fs::create_directories(folder);
  for (const auto& items : {module.named_parameters(), module.named_buffers()}) {
    for (const auto& item : items) {
      const auto tensor = item.value().contiguous();
      std::ofstream(folder / item.key(), std::ios::binary)
          .write(static_cast<const char*>(tensor.data_ptr()), static_cast<std::streamsize>(tensor.nbytes()));
    }
  }
}

// Every parameter and buffer of `module` equals the raw bytes dump_raw (or the Python script) wrote.
void expect_raw(const torch::nn::Module& module, const fs::path& folder) {
  for (const auto& items : {module.named_parameters(), module.named_buffers()}) {
    for (const auto& item : items) {
      std::ifstream stream(folder / item.key(), std::ios::binary);
      ASSERT_TRUE(stream) << "no raw dump of " << item.key();
      const std::string bytes{std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>()};
      const auto tensor = item.value().contiguous();
      ASSERT_EQ(bytes.size(), tensor.nbytes()) << item.key();
      EXPECT_EQ(std::memcmp(bytes.data(), tensor.data_ptr(), bytes.size()), 0) << item.key();
    }
  }
}

// Across languages, both ways. C++ -> Python: torch_mp.load reads what torch_mp::save wrote, equal
// byte for byte to the raw dump written beside it. Python -> C++: torch_mp::load reads a checkpoint
// torch_mp.save wrote of a model with other values, equal to the script's raw dump; and it reads
// the C++ checkpoint saved again by Python, equal to the original. The interpreter: $TORCH_MP_PYTHON,
// else python3 on PATH (make test-cpp puts the project's virtual environment first).
TEST(Checkpoint, CrossLanguageRoundTrip) {
  TempFolder folder;
  torch::manual_seed(0);
  auto model = make_mlp();
  model->forward(torch::randn({4, 8}));
  torch_mp::save(*model, (folder.path / "from_cpp").string());
  dump_raw(*model, folder.path / "from_cpp_raw");
  const fs::path script = folder.path / "cross.py";
  std::ofstream(script)
      << "import os, sys, torch, torch_mp\n"
         "from torch import nn\n"
         "def make():\n"
         "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4))\n"
         "def raw(folder, name, like):\n"
         "    with open(os.path.join(folder, name), 'rb') as f:\n"
         "        return torch.frombuffer(bytearray(f.read()), dtype=like.dtype).view(like.shape)\n"
         "root = sys.argv[1]\n"
         "model = make()\n"
         "torch_mp.load(model, root + '/from_cpp')\n"
         "state = model.state_dict()\n"
         "for name, tensor in state.items():\n"
         "    assert torch.equal(tensor, raw(root + '/from_cpp_raw', name, tensor)), name\n"
         "assert model[2].num_batches_tracked.item() == 1\n"
         "torch_mp.save(model, root + '/resaved_by_python')\n"
         "torch.manual_seed(7)\n"
         "other = make()\n"
         "other(torch.randn(6, 8))\n"
         "torch_mp.save(other, root + '/from_python', extra={'by': 'python'})\n"
         "os.makedirs(root + '/from_python_raw')\n"
         "for name, tensor in other.state_dict().items():\n"
         "    with open(os.path.join(root + '/from_python_raw', name), 'wb') as f:\n"
         "        f.write(tensor.contiguous().numpy().tobytes())\n";
  const char* python = std::getenv("TORCH_MP_PYTHON");
  const std::string command =
      std::string(python ? python : "python3") + " " + script.string() + " " + folder.path.string();
  ASSERT_EQ(std::system(command.c_str()), 0) << "failed: " << command;

  torch::manual_seed(1);
  auto resaved = make_mlp();
  torch_mp::load(*resaved, (folder.path / "resaved_by_python").string());
  expect_same_state(*model, *resaved);

  auto from_python = make_mlp();
  torch_mp::load(*from_python, (folder.path / "from_python").string());
  expect_raw(*from_python, folder.path / "from_python_raw");
  EXPECT_FALSE(
      torch::equal(from_python[0]->as<torch::nn::Linear>()->weight, model[0]->as<torch::nn::Linear>()->weight));
}

// A pipeline across two ranks (pp 2, threads over one store) saves in torch_mp.save's format: one
// file per rank, each with its stages' tensors under the stock names. Python's torch_mp.load reads
// it into the plain model, equal byte for byte to the dense model's raw dump (C++'s torch_mp::load
// too); and a checkpoint Python saved of a plain model loads into the pipeline's stages, each rank
// taking its own, equal to the script's raw dump.
TEST(Checkpoint, PipelineAcrossRanksRoundTripsWithPython) {
  TempFolder folder;
  torch::manual_seed(0);
  auto model = make_mlp();
  model->forward(torch::randn({4, 8}));
  dump_raw(*model, folder.path / "from_cpp_raw");
  auto copy = [&] {
    return torch::nn::Sequential(std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone()));
  };
  const auto from_cpp = (folder.path / "from_cpp").string();
  torch_mp::testing::run_two_ranks("ckpt_pp_save", [&](const torch_mp::Group& group) {
    auto pipe = torch_mp::pipeline_parallel(copy(), group);
    torch_mp::save(pipe, from_cpp);
  });
  EXPECT_EQ(entries(from_cpp), (std::vector<std::string>{"rank-00000-of-00002.safetensors",
                                                         "rank-00001-of-00002.safetensors",
                                                         "torch_mp_checkpoint.json"}));
  auto plain = make_mlp();
  torch_mp::load(*plain, from_cpp);
  expect_same_state(*model, *plain);

  const fs::path script = folder.path / "pipeline.py";
  std::ofstream(script)
      << "import os, sys, torch, torch_mp\n"
         "from torch import nn\n"
         "def make():\n"
         "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4))\n"
         "def raw(folder, name, like):\n"
         "    with open(os.path.join(folder, name), 'rb') as f:\n"
         "        return torch.frombuffer(bytearray(f.read()), dtype=like.dtype).view(like.shape)\n"
         "root = sys.argv[1]\n"
         "model = make()\n"
         "torch_mp.load(model, root + '/from_cpp')\n"
         "for name, tensor in model.state_dict().items():\n"
         "    assert torch.equal(tensor, raw(root + '/from_cpp_raw', name, tensor)), name\n"
         "torch.manual_seed(7)\n"
         "other = make()\n"
         "other(torch.randn(6, 8))\n"
         "torch_mp.save(other, root + '/from_python')\n"
         "os.makedirs(root + '/from_python_raw')\n"
         "for name, tensor in other.state_dict().items():\n"
         "    with open(os.path.join(root + '/from_python_raw', name), 'wb') as f:\n"
         "        f.write(tensor.contiguous().numpy().tobytes())\n";
  const char* python = std::getenv("TORCH_MP_PYTHON");
  const std::string command =
      std::string(python ? python : "python3") + " " + script.string() + " " + folder.path.string();
  ASSERT_EQ(std::system(command.c_str()), 0) << "failed: " << command;

  torch_mp::testing::run_two_ranks("ckpt_pp_load", [&](const torch_mp::Group& group) {
    auto pipe = torch_mp::pipeline_parallel(copy(), group);
    torch_mp::load(pipe, (folder.path / "from_python").string());
    expect_raw(*pipe, folder.path / "from_python_raw");
    EXPECT_FALSE(pipe->named_parameters().is_empty());
  });
}
