// torch_mp::save / torch_mp::load: the checkpoint format of torch_mp/checkpoint.py (described in
// torch_mp/_checkpoint/format.py): for single-process LibTorch modules, and for a C++ pipeline whose
// ranks each write their stages (detail::save_checkpoint / load_checkpoint, checkpoint/sharded.h).
#include <torch_mp/checkpoint.h>

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <tuple>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/grad_mode.h>

#include "checkpoint/format.h"
#include "checkpoint/sharded.h"

namespace torch_mp {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

constexpr const char* kIndex = "torch_mp_checkpoint.json";
constexpr const char* kFormat = "torch_mp.checkpoint";
constexpr int64_t kVersion = 1;

// --- safetensors, CRC-32, files -----------------------------------------------------------------

std::string dtype_name(at::ScalarType dtype, const std::string& key) {
  for (const auto& [name, type] : detail::safetensors_dtypes()) {
    if (type == dtype) {
      return name;
    }
  }
  TORCH_CHECK_VALUE(false, "torch_mp::save: '", key, "' has dtype ", dtype, ", which the checkpoint format does not hold");
}

uint32_t crc32(const at::Tensor& tensor) { // zlib's CRC-32, as Python's zlib.crc32
  static const auto table = [] {
    std::array<uint32_t, 256> entries{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) {
        c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      }
      entries[i] = c;
    }
    return entries;
  }();
  const auto* data = static_cast<const uint8_t*>(tensor.data_ptr());
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < tensor.nbytes(); ++i) {
    c = table[(c ^ data[i]) & 0xFF] ^ (c >> 8);
  }
  return c ^ 0xFFFFFFFFu;
}

std::string error_text() {
  return std::strerror(errno);
}

void write_synced(const fs::path& path, const std::vector<std::pair<const void*, size_t>>& chunks) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  TORCH_CHECK(fd >= 0, "torch_mp::save: cannot create ", path, ": ", error_text());
  for (const auto& [data, size] : chunks) {
    size_t done = 0;
    while (done < size) {
      ssize_t count = ::write(fd, static_cast<const char*>(data) + done, size - done);
      if (count < 0 && errno == EINTR) {
        continue;
      }
      TORCH_CHECK(count > 0, "torch_mp::save: writing ", path, " failed: ", error_text());
      done += count;
    }
  }
  TORCH_CHECK(::fsync(fd) == 0 && ::close(fd) == 0, "torch_mp::save: fsync of ", path, " failed: ", error_text());
}

void fsync_folder(const fs::path& folder) {
  int fd = ::open(folder.c_str(), O_RDONLY);
  bool synced = fd >= 0 && ::fsync(fd) == 0;
  std::string error = error_text();
  if (fd >= 0) {
    ::close(fd);
  }
  TORCH_CHECK(synced, "torch_mp::save: fsync of the folder ", folder, " failed: ", error);
}

// A safetensors file whose header is checked whole on opening (detail::read_safetensors_header):
// every read then lies inside the file, and no tensor is larger than the file.
class SafetensorsReader {
 public:
  explicit SafetensorsReader(fs::path path) : path_(std::move(path)) {
    fd_ = ::open(path_.c_str(), O_RDONLY);
    TORCH_CHECK_VALUE(fd_ >= 0, "torch_mp::load: cannot open ", path_, ": ", error_text());
    const off_t size = ::lseek(fd_, 0, SEEK_END);
    TORCH_CHECK_VALUE(size >= 0, "torch_mp::load: cannot seek in ", path_, ": ", error_text());
    header_ = detail::read_safetensors_header(path_.string(), static_cast<uint64_t>(size),
                                              [this](void* data, uint64_t count, uint64_t offset) {
                                                read_at(data, count, offset);
                                              });
  }
  ~SafetensorsReader() {
    ::close(fd_);
  }
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  // The header's entry `key`; a c10::ValueError when the file lacks it.
  const detail::SafetensorsEntry& entry(const std::string& key) const {
    auto found = header_.find(key);
    TORCH_CHECK_VALUE(found != header_.end(), "torch_mp::load: ", path_, " lacks '", key, "', which the index names");
    return found->second;
  }

  at::Tensor read(const std::string& key) const {
    const auto& found = entry(key);
    auto tensor = at::empty(found.shape, at::TensorOptions().dtype(found.dtype));
    read_at(tensor.data_ptr(), found.end - found.begin, found.begin);
    return tensor;
  }

  const fs::path& path() const {
    return path_;
  }

 private:
  void read_at(void* data, uint64_t size, uint64_t offset) const {
    uint64_t done = 0;
    while (done < size) {
      ssize_t count = ::pread(fd_, static_cast<char*>(data) + done, size - done, offset + done);
      if (count < 0 && errno == EINTR) {
        continue;
      }
      TORCH_CHECK_VALUE(count > 0, "torch_mp::load: ", path_, " ends before its data does: the file is truncated");
      done += count;
    }
  }

  fs::path path_;
  int fd_ = -1;
  std::map<std::string, detail::SafetensorsEntry> header_;
};

// The whole stock tensor of an index entry, joined from its pieces. Each piece's dtype and shape are
// checked against the file's header before anything is read or allocated (so the tensor is no larger
// than the files), and its CRC-32 once read.
at::Tensor read_entry(const std::string& name, const detail::IndexEntry& entry,
                      std::map<fs::path, std::unique_ptr<SafetensorsReader>>& files) {
  std::vector<const SafetensorsReader*> readers;
  for (const auto& piece : entry.pieces) {
    if (!files.count(piece.path)) {
      TORCH_CHECK_VALUE(fs::exists(piece.path), "torch_mp::load: ", piece.path, " is missing; the index names it");
      files[piece.path] = std::make_unique<SafetensorsReader>(piece.path);
    }
    readers.push_back(files[piece.path].get());
    std::vector<int64_t> expected = entry.shape;
    if (entry.dim) {
      expected[*entry.dim] = 0;
      for (const auto& [start, stop] : piece.bounds) {
        expected[*entry.dim] += stop - start;
      }
    }
    const auto& stored = readers.back()->entry(piece.key);
    TORCH_CHECK_VALUE(stored.shape == expected && stored.dtype == entry.dtype, "torch_mp::load: ", piece.path,
                      " holds '", piece.key, "' as ", stored.dtype, " ", c10::IntArrayRef(stored.shape),
                      "; the index says ", entry.dtype, " ", c10::IntArrayRef(expected), ": the checkpoint is corrupted");
  }
  at::Tensor full = entry.dim ? at::empty(entry.shape, at::TensorOptions().dtype(entry.dtype)) : at::Tensor();
  for (size_t i = 0; i < entry.pieces.size(); ++i) {
    const auto& piece = entry.pieces[i];
    auto tensor = readers[i]->read(piece.key);
    TORCH_CHECK_VALUE(crc32(tensor) == piece.crc32, "torch_mp::load: checksum mismatch in ", piece.path, " for '",
                      piece.key, "': the file is corrupted");
    if (!entry.dim) {
      return tensor;
    }
    int64_t at = 0;
    for (const auto& [start, stop] : piece.bounds) {
      full.narrow(*entry.dim, start, stop - start).copy_(tensor.narrow(*entry.dim, at, stop - start));
      at += stop - start;
    }
  }
  return full;
}

std::string names_of(const std::vector<std::string>& names) {
  std::ostringstream out;
  for (size_t i = 0; i < names.size() && i < 10; ++i) {
    out << (i ? ", " : "") << "'" << names[i] << "'";
  }
  return "[" + out.str() + (names.size() > 10 ? ", ..." : "") + "]";
}

// This rank's safetensors file `file` in `temp`: the tensors (tied ones once), each through the
// CPU. Returns the manifest of its pieces: for every name its index entry, as torch_mp.save's
// ranks write theirs.
Json write_rank_file(const fs::path& temp, const std::string& file,
                     const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  // Header first (it needs only shapes), then each tensor through the CPU; tied tensors once.
  Json header = Json::object();
  std::vector<std::string> file_keys;
  std::vector<at::Tensor> stored;
  std::map<std::tuple<const void*, at::ScalarType, std::vector<int64_t>>, std::string> seen;
  int64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    auto identity = std::make_tuple(tensor.data_ptr(), tensor.scalar_type(), tensor.sizes().vec());
    if (tensor.numel() > 0 && seen.count(identity)) {
      file_keys.push_back(seen[identity]);
      continue;
    }
    seen[identity] = name;
    file_keys.push_back(name);
    int64_t nbytes = tensor.numel() * tensor.element_size();
    header[name] = {{"dtype", dtype_name(tensor.scalar_type(), name)},
                    {"shape", tensor.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    stored.push_back(tensor);
  }
  std::string header_text = header.dump();
  header_text.append((8 - (8 + header_text.size()) % 8) % 8, ' '); // data 8-byte aligned, as the safetensors package does
  uint64_t length = header_text.size();

  std::vector<at::Tensor> on_cpu;
  std::vector<std::pair<const void*, size_t>> chunks = {{&length, sizeof(length)}, {header_text.data(), header_text.size()}};
  std::map<std::string, uint32_t> checksums;
  for (size_t i = 0; i < stored.size(); ++i) {
    on_cpu.push_back(stored[i].detach().to(at::kCPU).contiguous());
    chunks.emplace_back(on_cpu.back().data_ptr(), on_cpu.back().nbytes());
  }
  write_synced(temp / file, chunks);
  {
    size_t next = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (file_keys[i] == tensors[i].first) {
        checksums[file_keys[i]] = crc32(on_cpu[next++]);
      }
    }
  }
  Json manifest = Json::object();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, tensor] = tensors[i];
    manifest[name] = {{"dtype", dtype_name(tensor.scalar_type(), name)},
                      {"shape", tensor.sizes().vec()},
                      {"dim", nullptr},
                      {"pieces", Json::array({{{"file", file}, {"key", file_keys[i]}, {"bounds", nullptr},
                                               {"crc32", checksums[file_keys[i]]}}})}};
  }
  return manifest;
}

std::string rank_file(int64_t rank, int64_t world) {
  char name[64];
  std::snprintf(name, sizeof(name), "rank-%05lld-of-%05lld.safetensors", static_cast<long long>(rank),
                static_cast<long long>(world));
  return name;
}

fs::path manifest_file(const fs::path& temp, int64_t rank) {
  char name[32];
  std::snprintf(name, sizeof(name), "rank-%05lld.json", static_cast<long long>(rank));
  return temp / name;
}

// Runs `body`, then every rank learns whether any rank failed in it (agree throws then).
template <typename Body>
void on_every_rank(const detail::AgreeOnStep& agree, const std::string& step, Body body) {
  std::exception_ptr error;
  try {
    body();
  } catch (...) {
    error = std::current_exception();
  }
  agree(step, error);
}

} // namespace

namespace detail {

std::vector<std::pair<std::string, at::Tensor>> named_tensors(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& item : module.named_parameters()) {
    tensors.emplace_back(item.key(), item.value());
  }
  for (const auto& item : module.named_buffers()) {
    tensors.emplace_back(item.key(), item.value());
  }
  return tensors;
}


void save_checkpoint(
    const std::vector<std::pair<std::string, at::Tensor>>& tensors,
    const std::vector<std::string>& model,
    const std::string& path,
    int64_t rank,
    int64_t world,
    const AgreeOnStep& agree) {
  const fs::path final_path = fs::absolute(path);
  const fs::path temp = final_path.string() + ".incomplete", old = final_path.string() + ".old";
  auto mine = tensors;
  on_every_rank(agree, "preparing the save", [&] {
    if (rank == 0) {
      TORCH_CHECK_VALUE(!fs::exists(final_path) || fs::exists(final_path / kIndex) ||
                            (fs::is_directory(final_path) && fs::is_empty(final_path)),
                        "torch_mp::save: path ", final_path, " exists and is not a torch_mp checkpoint; expected a new "
                        "path, an empty folder or an earlier checkpoint, which the save replaces");
      fs::remove_all(temp); // left by a save that did not finish
      fs::create_directories(temp);
    }
    at::Generator generator = at::detail::getDefaultCPUGenerator(); // a handle on the default generator
    std::lock_guard<std::mutex> lock(generator.mutex());
    mine.emplace_back("rng/cpu/" + std::to_string(rank), generator.get_state());
  });
  Json manifest;
  on_every_rank(agree, "writing its checkpoint file", [&] {
    manifest = write_rank_file(temp, rank_file(rank, world), mine);
    if (rank != 0) {
      const std::string text = manifest.dump();
      write_synced(manifest_file(temp, rank), {{text.data(), text.size()}});
    }
  });
  on_every_rank(agree, "writing the index and renaming the checkpoint into place", [&] {
    if (rank != 0) {
      return;
    }
    Json entries = manifest;
    for (int64_t r = 1; r < world; ++r) {
      std::ifstream stream(manifest_file(temp, r), std::ios::binary);
      std::stringstream text;
      text << stream.rdbuf();
      const auto theirs = Json::parse(text.str());
      for (const auto& [name, entry] : theirs.items()) {
        if (entries.contains(name)) {
          for (const auto& piece : entry["pieces"]) {
            entries[name]["pieces"].push_back(piece);
          }
        } else {
          entries[name] = entry;
        }
      }
      fs::remove(manifest_file(temp, r));
    }
    for (const auto& name : model) {
      TORCH_CHECK(entries.contains(name), "torch_mp::save: no rank wrote '", name, "'; expected every tensor of the "
                  "model to be held by a rank");
    }
    const Json index = {{"format", kFormat}, {"version", kVersion}, {"checksum", "crc32 (zlib) of each piece's bytes"},
                        {"world_size", world}, {"model", model}, {"tensors", entries}, {"optimizer", nullptr},
                        {"extra", Json::object()}};
    const std::string index_text = index.dump(1);
    write_synced(temp / kIndex, {{index_text.data(), index_text.size()}});
    fsync_folder(temp);

    // rename(2) cannot replace a non-empty folder: the earlier checkpoint is set aside as .old (which
    // loading falls back to) for the moment between the two renames.
    if (fs::is_directory(final_path) && !fs::is_empty(final_path)) {
      fs::remove_all(old);
      fs::rename(final_path, old);
    } else if (fs::exists(final_path)) {
      fs::remove(final_path);
    }
    fs::rename(temp, final_path);
    fsync_folder(final_path.parent_path());
    fs::remove_all(old);
  });
}

void load_checkpoint(
    const std::vector<std::pair<std::string, at::Tensor>>& targets,
    const std::string& path,
    bool partial,
    int64_t rank,
    int64_t world) {
  fs::path folder;
  for (const fs::path& candidate : {fs::path(path), fs::path(path + ".old")}) {
    if (folder.empty() && fs::exists(candidate / kIndex)) {
      folder = candidate;
    }
  }
  TORCH_CHECK_VALUE(!folder.empty(), "torch_mp::load: no complete checkpoint found at \"", path, "\"",
                    fs::exists(path + ".incomplete") ? " (found a save that did not finish: " + path + ".incomplete)" : "",
                    "; expected a folder written by torch_mp::save or torch_mp.save, holding ", kIndex);
  const fs::path index_path = detail::file_in_folder(folder, kIndex, "torch_mp::load: the checkpoint folder " +
                                                       folder.string());
  std::ifstream stream(index_path, std::ios::binary);
  std::stringstream text;
  text << stream.rdbuf();
  const auto index = detail::parse_checkpoint_index(folder, index_path.string(), text.str());
  const std::set<std::string> stored(index.model.begin(), index.model.end());
  std::vector<std::string> missing, unexpected;
  std::set<std::string> wanted;
  for (const auto& [name, tensor] : targets) {
    wanted.insert(name);
    if (!stored.count(name)) {
      missing.push_back(name);
    }
  }
  for (const auto& name : stored) {
    if (!partial && !wanted.count(name)) {
      unexpected.push_back(name);
    }
  }
  TORCH_CHECK_VALUE(missing.empty() && unexpected.empty(), "torch_mp::load: the checkpoint at ", folder,
                    " lacks keys ", names_of(missing), " of the module and holds keys ", names_of(unexpected),
                    " the module does not have; expected a checkpoint of this module");
  for (const auto& [name, tensor] : targets) {
    const auto& shape = index.tensors.at(name).shape;
    TORCH_CHECK_VALUE(tensor.sizes() == c10::IntArrayRef(shape), "torch_mp::load: '", name, "' has shape ",
                      c10::IntArrayRef(shape), " in the checkpoint at ", folder, "; the module expects ", tensor.sizes());
  }
  std::map<fs::path, std::unique_ptr<SafetensorsReader>> files;
  torch::NoGradGuard no_grad;
  for (const auto& [name, tensor] : targets) {
    at::Tensor target = tensor;
    target.copy_(read_entry(name, index.tensors.at(name), files));
  }
  const auto rng_key = "rng/cpu/" + std::to_string(rank);
  auto rng = index.tensors.find(rng_key);
  if (index.world_size == world && rng != index.tensors.end()) {
    auto state = read_entry(rng_key, rng->second, files);
    at::Generator generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    const auto current = generator.get_state();
    TORCH_CHECK_VALUE(state.scalar_type() == current.scalar_type() && state.sizes() == current.sizes(),
                      "torch_mp::load: '", rng_key, "' in ", folder, " is ", state.scalar_type(), " ", state.sizes(),
                      "; expected a CPU random state, ", current.scalar_type(), " ", current.sizes());
    generator.set_state(state);
  }
}

} // namespace detail

void save(const torch::nn::Module& module, const std::string& path) {
  const auto tensors = detail::named_tensors(module);
  std::vector<std::string> model;
  for (const auto& [name, tensor] : tensors) {
    model.push_back(name);
  }
  detail::save_checkpoint(tensors, model, path, 0, 1, [](const std::string&, std::exception_ptr error) {
    if (error) {
      std::rethrow_exception(error);
    }
  });
}

void load(torch::nn::Module& module, const std::string& path) {
  detail::load_checkpoint(detail::named_tensors(module), path, false, 0, 1);
}

} // namespace torch_mp
