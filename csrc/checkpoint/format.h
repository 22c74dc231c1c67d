#pragma once

// Reading what a checkpoint folder claims, trusting none of it: the safetensors header of a file and
// the JSON index torch_mp_checkpoint.json (the format of torch_mp/_checkpoint_format.py), each
// parsed with nlohmann/json and checked whole before any tensor is read. Every fault is a
// c10::ValueError naming the file and what is wrong. Needs c10's headers and libc10 only, so that the
// fuzz target (tests/fuzz) builds without the rest of LibTorch.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/ScalarType.h>

namespace torch_mp::detail {

// The safetensors dtypes torch_mp reads and writes, by name ("F32", ...).
const std::vector<std::pair<std::string, c10::ScalarType>>& safetensors_dtypes();

// One tensor of a safetensors header: its dtype, shape and where its bytes lie in the file
// ([begin, end), absolute offsets, end - begin = its byte size, end <= the file's size).
struct SafetensorsEntry {
  c10::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

// Reads `size` bytes at `offset` of the file into `data`.
using ReadAt = std::function<void(void* data, uint64_t size, uint64_t offset)>;

// The header of the safetensors file `file` of `file_size` bytes, read through `read_at` only within
// the file, and checked as the safetensors library does: the header length within the file, valid
// JSON, known dtypes, sizes >= 0 whose byte count does not overflow, data_offsets that tile the data
// exactly (no gap, no overlap, to the end of the file).
std::map<std::string, SafetensorsEntry> read_safetensors_header(const std::string& file, uint64_t file_size,
                                                                const ReadAt& read_at);

// The real path of the file `name` that an index of `folder` names (`what` says which entry), once
// checked to lie inside the folder: relative, no "..", no symlink leading out of it.
std::filesystem::path file_in_folder(const std::filesystem::path& folder, const std::string& name,
                                     const std::string& what);

struct IndexPiece {
  std::filesystem::path path; // checked by file_in_folder
  std::string key;
  std::vector<std::pair<int64_t, int64_t>> bounds; // [start, stop) of the stock tensor along dim
  uint32_t crc32 = 0;
};

struct IndexEntry {
  c10::ScalarType dtype;
  std::vector<int64_t> shape;
  std::optional<int64_t> dim; // none: the tensor is whole, in its one piece
  std::vector<IndexPiece> pieces;
};

struct CheckpointIndex {
  int64_t world_size = 1;
  std::vector<std::string> model; // the module's names, each a key of tensors
  std::map<std::string, IndexEntry> tensors;
};

// Parses and checks the index `text` of the checkpoint `folder` (read from `index_file`): the
// format and version, the types of every field, known dtypes, dims within the shape, the pieces'
// ranges within the shape and covering it once, and every file inside the folder.
CheckpointIndex parse_checkpoint_index(const std::filesystem::path& folder, const std::string& index_file,
                                       const std::string& text);

} // namespace torch_mp::detail
