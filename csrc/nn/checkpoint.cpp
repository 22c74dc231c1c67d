// torch_mp::save / torch_mp::load: the checkpoint format of torch_mp/checkpoint.py (described in
// torch_mp/_checkpoint_format.py) for single-process LibTorch modules.
#include <torch_mp/checkpoint.h>

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
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
#include <torch/csrc/autograd/grad_mode.h>

#include "detail/json.h"

namespace torch_mp {
namespace {

namespace fs = std::filesystem;
using detail::Json;
using detail::json_list;
using detail::parse_json;
using detail::quoted;

constexpr const char* kIndex = "torch_mp_checkpoint.json";
constexpr const char* kFormat = "torch_mp.checkpoint";
constexpr int64_t kVersion = 1;
constexpr const char* kRankFile = "rank-00000-of-00001.safetensors";
constexpr const char* kRng = "rng/cpu/0";

// --- safetensors, CRC-32, files -----------------------------------------------------------------

const std::vector<std::pair<std::string, at::ScalarType>>& dtypes() {
  static const std::vector<std::pair<std::string, at::ScalarType>> table = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool}};
  return table;
}

std::string dtype_name(at::ScalarType dtype, const std::string& key) {
  for (const auto& [name, type] : dtypes()) {
    if (type == dtype) {
      return name;
    }
  }
  TORCH_CHECK_VALUE(false, "torch_mp::save: '", key, "' has dtype ", dtype, ", which the checkpoint format does not hold");
}

at::ScalarType dtype_of(const std::string& name, const std::string& where) {
  for (const auto& [known, type] : dtypes()) {
    if (known == name) {
      return type;
    }
  }
  TORCH_CHECK_VALUE(false, "torch_mp::load: ", where, " has dtype ", name, ", which torch_mp::load cannot read");
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

class SafetensorsReader {
 public:
  explicit SafetensorsReader(fs::path path) : path_(std::move(path)) {
    fd_ = ::open(path_.c_str(), O_RDONLY);
    TORCH_CHECK_VALUE(fd_ >= 0, "torch_mp::load: cannot open ", path_, ": ", error_text());
    uint64_t length = 0;
    read_at(&length, sizeof(length), 0);
    std::string header(length, ' ');
    read_at(header.data(), length, sizeof(length));
    header_ = parse_json(header);
    data_start_ = sizeof(length) + length;
  }
  ~SafetensorsReader() {
    ::close(fd_);
  }
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  at::Tensor read(const std::string& key) const {
    const Json* entry = header_.find(key);
    TORCH_CHECK_VALUE(entry != nullptr, "torch_mp::load: ", path_, " lacks '", key, "', which the index names");
    std::vector<int64_t> shape;
    for (const auto& size : entry->at("shape").items) {
      shape.push_back(size.integer());
    }
    auto tensor = at::empty(shape, at::TensorOptions().dtype(dtype_of(entry->at("dtype").text, path_.string())));
    read_at(tensor.data_ptr(), tensor.nbytes(), data_start_ + entry->at("data_offsets").items.at(0).integer());
    return tensor;
  }

 private:
  void read_at(void* data, size_t size, size_t offset) const {
    size_t done = 0;
    while (done < size) {
      ssize_t count = ::pread(fd_, static_cast<char*>(data) + done, size - done, offset + done);
      TORCH_CHECK_VALUE(count > 0, "torch_mp::load: ", path_, " ends before its data does: the file is truncated");
      done += count;
    }
  }

  fs::path path_;
  int fd_ = -1;
  Json header_;
  size_t data_start_ = 0;
};

// The whole stock tensor of an index entry, joined from its pieces, each checked.
at::Tensor read_entry(const fs::path& folder, const std::string& name, const Json& entry,
                      std::map<std::string, std::unique_ptr<SafetensorsReader>>& files) {
  std::vector<int64_t> shape;
  for (const auto& size : entry.at("shape").items) {
    shape.push_back(size.integer());
  }
  const Json& dim_value = entry.at("dim");
  const bool whole = dim_value.kind == Json::Kind::Null;
  const int64_t dim = whole ? 0 : dim_value.integer();
  auto full = at::empty(shape, at::TensorOptions().dtype(dtype_of(entry.at("dtype").text, name)));
  int64_t covered = 0;
  for (const auto& piece : entry.at("pieces").items) {
    const std::string& file = piece.at("file").text;
    if (!files.count(file)) {
      TORCH_CHECK_VALUE(fs::exists(folder / file), "torch_mp::load: ", folder / file, " is missing; the index names it");
      files[file] = std::make_unique<SafetensorsReader>(folder / file);
    }
    auto tensor = files[file]->read(piece.at("key").text);
    std::vector<int64_t> expected = shape;
    if (!whole) {
      expected[dim] = 0;
      for (const auto& bounds : piece.at("bounds").items) {
        expected[dim] += bounds.items.at(1).integer() - bounds.items.at(0).integer();
      }
    }
    TORCH_CHECK_VALUE(tensor.sizes() == c10::IntArrayRef(expected) && tensor.scalar_type() == full.scalar_type(),
                      "torch_mp::load: ", folder / file, " holds '", piece.at("key").text, "' as ", tensor.scalar_type(),
                      " ", tensor.sizes(), "; the index says ", full.scalar_type(), " ", c10::IntArrayRef(expected),
                      ": the checkpoint is corrupted");
    uint32_t found = crc32(tensor);
    TORCH_CHECK_VALUE(found == static_cast<uint32_t>(piece.at("crc32").integer()), "torch_mp::load: checksum mismatch in ",
                      folder / file, " for '", piece.at("key").text, "': the file is corrupted");
    if (whole) {
      return tensor;
    }
    int64_t at = 0;
    for (const auto& bounds : piece.at("bounds").items) {
      int64_t start = bounds.items.at(0).integer(), length = bounds.items.at(1).integer() - start;
      full.narrow(dim, start, length).copy_(tensor.narrow(dim, at, length));
      at += length;
      covered += length;
    }
  }
  TORCH_CHECK_VALUE(covered == shape[dim], "torch_mp::load: the pieces of '", name, "' in ", folder, " cover ", covered,
                    " of its ", shape[dim], " entries along dim ", dim);
  return full;
}

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

std::string names_of(const std::vector<std::string>& names) {
  std::ostringstream out;
  for (size_t i = 0; i < names.size() && i < 10; ++i) {
    out << (i ? ", " : "") << "'" << names[i] << "'";
  }
  return "[" + out.str() + (names.size() > 10 ? ", ..." : "") + "]";
}

} // namespace

void save(const torch::nn::Module& module, const std::string& path) {
  const fs::path final_path = fs::absolute(path);
  const fs::path temp = final_path.string() + ".incomplete", old = final_path.string() + ".old";
  TORCH_CHECK_VALUE(!fs::exists(final_path) || fs::exists(final_path / kIndex) ||
                        (fs::is_directory(final_path) && fs::is_empty(final_path)),
                    "torch_mp::save: path ", final_path, " exists and is not a torch_mp checkpoint; expected a new "
                    "path, an empty folder or an earlier checkpoint, which the save replaces");
  auto tensors = named_tensors(module);
  {
    at::Generator generator = at::detail::getDefaultCPUGenerator(); // a handle on the default generator
    std::lock_guard<std::mutex> lock(generator.mutex());
    tensors.emplace_back(kRng, generator.get_state());
  }
  // Header first (it needs only shapes), then each tensor through the CPU; tied tensors once.
  std::ostringstream header;
  std::vector<std::string> file_keys;
  std::vector<at::Tensor> stored;
  std::map<std::tuple<const void*, at::ScalarType, std::vector<int64_t>>, std::string> seen;
  int64_t offset = 0;
  header << '{';
  for (const auto& [name, tensor] : tensors) {
    auto identity = std::make_tuple(tensor.data_ptr(), tensor.scalar_type(), tensor.sizes().vec());
    if (tensor.numel() > 0 && seen.count(identity)) {
      file_keys.push_back(seen[identity]);
      continue;
    }
    seen[identity] = name;
    file_keys.push_back(name);
    int64_t nbytes = tensor.numel() * tensor.element_size();
    header << (stored.empty() ? "" : ",") << quoted(name) << ":{\"dtype\":\"" << dtype_name(tensor.scalar_type(), name)
           << "\",\"shape\":" << json_list(tensor.sizes()) << ",\"data_offsets\":[" << offset << ',' << offset + nbytes
           << "]}";
    offset += nbytes;
    stored.push_back(tensor);
  }
  header << '}';
  std::string header_text = header.str();
  header_text.append((8 - (8 + header_text.size()) % 8) % 8, ' '); // data 8-byte aligned, as the safetensors package does
  uint64_t length = header_text.size();

  fs::remove_all(temp); // left by a save that did not finish
  fs::create_directories(temp);
  std::vector<at::Tensor> on_cpu;
  std::vector<std::pair<const void*, size_t>> chunks = {{&length, sizeof(length)}, {header_text.data(), header_text.size()}};
  std::map<std::string, uint32_t> checksums;
  for (size_t i = 0; i < stored.size(); ++i) {
    on_cpu.push_back(stored[i].detach().to(at::kCPU).contiguous());
    chunks.emplace_back(on_cpu.back().data_ptr(), on_cpu.back().nbytes());
  }
  write_synced(temp / kRankFile, chunks);
  {
    size_t next = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (file_keys[i] == tensors[i].first) {
        checksums[file_keys[i]] = crc32(on_cpu[next++]);
      }
    }
  }

  std::ostringstream index;
  index << "{\"format\":" << quoted(kFormat) << ",\"version\":" << kVersion
        << ",\"checksum\":\"crc32 (zlib) of each piece's bytes\",\"world_size\":1,\"model\":[";
  for (size_t i = 0; i + 1 < tensors.size(); ++i) { // every name but the random state's
    index << (i ? "," : "") << quoted(tensors[i].first);
  }
  index << "],\"tensors\":{";
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, tensor] = tensors[i];
    index << (i ? "," : "") << quoted(name) << ":{\"dtype\":\"" << dtype_name(tensor.scalar_type(), name)
          << "\",\"shape\":" << json_list(tensor.sizes()) << ",\"dim\":null,\"pieces\":[{\"file\":" << quoted(kRankFile)
          << ",\"key\":" << quoted(file_keys[i]) << ",\"bounds\":null,\"crc32\":" << checksums[file_keys[i]] << "}]}";
  }
  index << "},\"optimizer\":null,\"extra\":{}}";
  const std::string index_text = index.str();
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
}

void load(torch::nn::Module& module, const std::string& path) {
  fs::path folder;
  for (const fs::path& candidate : {fs::path(path), fs::path(path + ".old")}) {
    if (folder.empty() && fs::exists(candidate / kIndex)) {
      folder = candidate;
    }
  }
  TORCH_CHECK_VALUE(!folder.empty(), "torch_mp::load: no complete checkpoint found at \"", path, "\"",
                    fs::exists(path + ".incomplete") ? " (found a save that did not finish: " + path + ".incomplete)" : "",
                    "; expected a folder written by torch_mp::save or torch_mp.save, holding ", kIndex);
  std::ifstream stream(folder / kIndex);
  std::stringstream text;
  text << stream.rdbuf();
  const Json index = parse_json(text.str());
  TORCH_CHECK_VALUE(index.at("format").text == kFormat && index.at("version").integer() == kVersion,
                    "torch_mp::load: ", folder / kIndex, " is format \"", index.at("format").text, "\" version ",
                    index.at("version").text, "; expected \"", kFormat, "\" version ", kVersion);
  const Json& entries = index.at("tensors");
  std::set<std::string> stored;
  for (const auto& name : index.at("model").items) {
    stored.insert(name.text);
  }
  auto targets = named_tensors(module);
  std::vector<std::string> missing, unexpected;
  std::set<std::string> wanted;
  for (const auto& [name, tensor] : targets) {
    wanted.insert(name);
    if (!stored.count(name)) {
      missing.push_back(name);
    }
  }
  for (const auto& name : stored) {
    if (!wanted.count(name)) {
      unexpected.push_back(name);
    }
  }
  TORCH_CHECK_VALUE(missing.empty() && unexpected.empty(), "torch_mp::load: the checkpoint at ", folder,
                    " lacks keys ", names_of(missing), " of the module and holds keys ", names_of(unexpected),
                    " the module does not have; expected a checkpoint of this module");
  for (const auto& [name, tensor] : targets) {
    std::vector<int64_t> shape;
    for (const auto& size : entries.at(name).at("shape").items) {
      shape.push_back(size.integer());
    }
    TORCH_CHECK_VALUE(tensor.sizes() == c10::IntArrayRef(shape), "torch_mp::load: '", name, "' has shape ",
                      c10::IntArrayRef(shape), " in the checkpoint at ", folder, "; the module expects ", tensor.sizes());
  }
  std::map<std::string, std::unique_ptr<SafetensorsReader>> files;
  torch::NoGradGuard no_grad;
  for (auto& [name, tensor] : targets) {
    tensor.copy_(read_entry(folder, name, entries.at(name), files));
  }
  if (index.at("world_size").integer() == 1 && entries.find(kRng) != nullptr) {
    auto state = read_entry(folder, kRng, entries.at(kRng), files);
    at::Generator generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(state);
  }
}

} // namespace torch_mp
