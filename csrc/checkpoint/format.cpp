#include "checkpoint/format.h"

#include <algorithm>
#include <limits>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

namespace torch_mp::detail {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

// The safetensors library's own bound on a header; a longer one is refused before it is read.
constexpr uint64_t kMaxHeader = 100'000'000;
constexpr const char* kFormat = "torch_mp.checkpoint";
constexpr int64_t kVersion = 1;

Json parse(const std::string& text, const std::string& file) {
  try {
    return Json::parse(text);
  } catch (const Json::exception& error) {
    TORCH_CHECK_VALUE(false, "torch_mp::load: ", file, " is not valid JSON: ", error.what());
  }
}

// `value` as a size (an integer in [0, 2^63)); nullopt for anything else.
std::optional<int64_t> size_of(const Json& value) {
  if (!value.is_number_unsigned() || value.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max())) {
    return std::nullopt;
  }
  return static_cast<int64_t>(value.get<uint64_t>());
}

std::optional<std::vector<int64_t>> shape_of(const Json& value) {
  if (!value.is_array()) {
    return std::nullopt;
  }
  std::vector<int64_t> shape;
  for (const auto& size : value) {
    auto checked = size_of(size);
    if (!checked) {
      return std::nullopt;
    }
    shape.push_back(*checked);
  }
  return shape;
}

std::optional<c10::ScalarType> dtype_of(const Json& value) {
  for (const auto& [name, dtype] : safetensors_dtypes()) {
    if (value.is_string() && value.get_ref<const std::string&>() == name) {
      return dtype;
    }
  }
  return std::nullopt;
}

// The bytes of a tensor of `shape` and `dtype`; nullopt when they overflow int64.
std::optional<uint64_t> byte_size(const std::vector<int64_t>& shape, c10::ScalarType dtype) {
  int64_t count = static_cast<int64_t>(c10::elementSize(dtype));
  for (int64_t size : shape) {
    if (__builtin_mul_overflow(count, size, &count)) {
      return std::nullopt;
    }
  }
  return static_cast<uint64_t>(count);
}

std::string dump(const Json& value) {
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  return text.size() > 200 ? text.substr(0, 200) + "..." : text;
}

} // namespace

const std::vector<std::pair<std::string, c10::ScalarType>>& safetensors_dtypes() {
  static const std::vector<std::pair<std::string, c10::ScalarType>> table = {
      {"F64", c10::kDouble}, {"F32", c10::kFloat}, {"F16", c10::kHalf}, {"BF16", c10::kBFloat16},
      {"I64", c10::kLong},   {"I32", c10::kInt},   {"I16", c10::kShort}, {"I8", c10::kChar},
      {"U8", c10::kByte},    {"BOOL", c10::kBool}};
  return table;
}

std::map<std::string, SafetensorsEntry> read_safetensors_header(const std::string& file, uint64_t file_size,
                                                                const ReadAt& read_at) {
  TORCH_CHECK_VALUE(file_size >= 8, "torch_mp::load: ", file, " has ", file_size,
                    " bytes; a safetensors file begins with an 8-byte header length");
  uint64_t length = 0;
  read_at(&length, sizeof(length), 0);
  TORCH_CHECK_VALUE(length <= file_size - 8 && length <= kMaxHeader, "torch_mp::load: ", file,
                    " claims a header of ", length, " bytes but has ", file_size - 8,
                    " after the length: the file is truncated or not safetensors");
  std::string text(length, ' ');
  read_at(text.data(), length, 8);
  const Json header = parse(text, file);
  TORCH_CHECK_VALUE(header.is_object(), "torch_mp::load: the header of ", file, " is not a JSON object");
  const uint64_t data_start = 8 + length, data_size = file_size - data_start;
  std::map<std::string, SafetensorsEntry> entries;
  for (auto item = header.begin(); item != header.end(); ++item) {
    const std::string& name = item.key();
    const Json& value = item.value();
    if (name == "__metadata__") {
      continue;
    }
    const auto fail = [&](const std::string& problem) {
      TORCH_CHECK_VALUE(false, "torch_mp::load: ", file, ": tensor '", name, "' ", problem, " (", dump(value),
                        "): the file is corrupted or not safetensors");
    };
    if (!value.is_object() || !value.contains("dtype") || !value.contains("shape") ||
        !value.contains("data_offsets")) {
      fail("is not an object with dtype, shape and data_offsets");
    }
    const auto dtype = dtype_of(value["dtype"]);
    if (!dtype) {
      fail("has a dtype torch_mp does not read");
    }
    const auto shape = shape_of(value["shape"]);
    if (!shape) {
      fail("has a shape that is not a list of sizes >= 0");
    }
    const auto nbytes = byte_size(*shape, *dtype);
    if (!nbytes) {
      fail("has a shape whose byte size overflows");
    }
    const Json& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !size_of(offsets[0]) || !size_of(offsets[1])) {
      fail("has data_offsets that are not [begin, end] with 0 <= begin");
    }
    const uint64_t begin = *size_of(offsets[0]), end = *size_of(offsets[1]);
    if (end < begin || end - begin != *nbytes || end > data_size) {
      fail("has data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + ") for " +
           std::to_string(*nbytes) + " bytes in a data section of " + std::to_string(data_size));
    }
    entries[name] = SafetensorsEntry{*dtype, *shape, data_start + begin, data_start + end};
  }
  // The data is tiled exactly, as the safetensors library requires: no gap, no overlap, no tail.
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (const auto& [name, entry] : entries) {
    spans.emplace_back(entry.begin, entry.end);
  }
  std::sort(spans.begin(), spans.end());
  uint64_t at = data_start;
  for (const auto& [begin, end] : spans) {
    TORCH_CHECK_VALUE(begin == at, "torch_mp::load: ", file, ": tensor data at byte ", begin - data_start,
                      " of the data section; expected the next tensor at byte ", at - data_start,
                      " (the data_offsets leave a gap or overlap)");
    at = end;
  }
  TORCH_CHECK_VALUE(at == file_size, "torch_mp::load: ", file, " has ", file_size - at,
                    " bytes after its last tensor; expected the data_offsets to cover the file");
  return entries;
}

fs::path file_in_folder(const fs::path& folder, const std::string& name, const std::string& what) {
  const fs::path relative(name);
  bool plain = !name.empty() && name.find('\0') == std::string::npos && relative.is_relative() &&
      !relative.has_root_name() && !relative.has_root_directory();
  for (const auto& part : relative) {
    plain = plain && part != "..";
  }
  TORCH_CHECK_VALUE(plain, what, " names the file \"", name, "\"; expected a relative path inside ", folder,
                    " (no absolute path, no '..')");
  std::error_code error;
  const fs::path root = fs::canonical(folder, error);
  TORCH_CHECK_VALUE(!error, what, ": cannot resolve the checkpoint folder ", folder, ": ", error.message());
  const fs::path path = fs::weakly_canonical(root / relative, error);
  TORCH_CHECK_VALUE(!error, what, ": cannot resolve \"", name, "\" in ", root, ": ", error.message());
  const auto mismatch = std::mismatch(root.begin(), root.end(), path.begin(), path.end());
  TORCH_CHECK_VALUE(mismatch.first == root.end() && mismatch.second != path.end(), what, " names the file \"", name,
                    "\", which resolves to ", path, ", outside the checkpoint folder ", root,
                    "; expected a file inside it");
  return path;
}

CheckpointIndex parse_checkpoint_index(const fs::path& folder, const std::string& index_file, const std::string& text) {
  const Json index = parse(text, index_file);
  const auto fail = [&](const std::string& problem) {
    TORCH_CHECK_VALUE(false, "torch_mp::load: ", index_file, ": ", problem,
                      "; the checkpoint is corrupted or not written by torch_mp.save");
  };
  if (!index.is_object()) {
    fail("the index is not a JSON object");
  }
  const Json format = index.value("format", Json()), version = index.value("version", Json());
  TORCH_CHECK_VALUE(format == kFormat && version == kVersion, "torch_mp::load: ", index_file, " is format ",
                    dump(format), " version ", dump(version), "; expected \"", kFormat, "\" version ", kVersion);
  const Json tensors = index.value("tensors", Json()), model = index.value("model", Json());
  if (!tensors.is_object() || !model.is_array()) {
    fail("'tensors' is not an object or 'model' is not a list");
  }
  CheckpointIndex result;
  const auto world_size = size_of(index.value("world_size", Json()));
  if (!world_size || *world_size < 1) {
    fail("'world_size' is " + dump(index.value("world_size", Json())) + "; expected an int >= 1");
  }
  result.world_size = *world_size;
  for (const auto& name : model) {
    if (!name.is_string() || !tensors.contains(name.get_ref<const std::string&>())) {
      fail("'model' names " + dump(name) + ", which 'tensors' lacks");
    }
    result.model.push_back(name.get<std::string>());
  }
  for (const auto& [name, value] : tensors.items()) {
    const std::string at = "tensor '" + name + "'";
    if (!value.is_object() || !value.contains("pieces") || !value["pieces"].is_array() || value["pieces"].empty()) {
      fail(at + " has no list of pieces");
    }
    IndexEntry entry;
    const auto dtype = dtype_of(value.value("dtype", Json()));
    const auto shape = shape_of(value.value("shape", Json()));
    if (!dtype || !shape || !byte_size(*shape, *dtype)) {
      fail(at + " has dtype " + dump(value.value("dtype", Json())) + " and shape " +
           dump(value.value("shape", Json())) + "; expected a safetensors dtype and sizes >= 0 that do not overflow");
    }
    entry.dtype = *dtype;
    entry.shape = *shape;
    const Json dim = value.value("dim", Json());
    const auto pieces = value["pieces"].size();
    if (!(dim.is_null() && pieces == 1) && !(size_of(dim) && *size_of(dim) < int64_t(shape->size()))) {
      fail(at + " has dim " + dump(dim) + " and " + std::to_string(pieces) +
           " pieces; expected one piece, or a dim of its shape");
    }
    if (!dim.is_null()) {
      entry.dim = *size_of(dim);
    }
    std::vector<std::pair<int64_t, int64_t>> ranges;
    for (size_t number = 0; number < pieces; ++number) {
      const Json& piece = value["pieces"][number];
      const std::string piece_at = at + " piece " + std::to_string(number);
      const Json bounds = piece.is_object() ? piece.value("bounds", Json()) : Json();
      const auto crc32 = piece.is_object() ? size_of(piece.value("crc32", Json())) : std::nullopt;
      if (!piece.is_object() || !piece.value("file", Json()).is_string() || !piece.value("key", Json()).is_string() ||
          !crc32 || *crc32 > 0xFFFFFFFFLL) {
        fail(piece_at + " is " + dump(piece) + "; expected an object with a file, a key and a CRC-32");
      }
      IndexPiece parsed;
      const int64_t extent = entry.dim ? entry.shape[*entry.dim] : 0;
      bool valid = entry.dim ? bounds.is_array() : bounds.is_null();
      for (size_t i = 0; valid && entry.dim && i < bounds.size(); ++i) {
        const Json& range = bounds[i];
        valid = range.is_array() && range.size() == 2 && size_of(range[0]) && size_of(range[1]) &&
            *size_of(range[0]) <= *size_of(range[1]) && *size_of(range[1]) <= extent;
        if (valid) {
          parsed.bounds.emplace_back(*size_of(range[0]), *size_of(range[1]));
        }
      }
      if (!valid) {
        fail(piece_at + " has bounds " + dump(bounds) + "; expected null for a whole tensor, else [start, stop] ranges "
             "within [0, " + std::to_string(extent) + "]");
      }
      ranges.insert(ranges.end(), parsed.bounds.begin(), parsed.bounds.end());
      parsed.key = piece["key"].get<std::string>();
      parsed.crc32 = static_cast<uint32_t>(*crc32);
      parsed.path = file_in_folder(folder, piece["file"].get<std::string>(), "torch_mp::load: " + index_file + ": " + piece_at);
      entry.pieces.push_back(std::move(parsed));
    }
    if (entry.dim) {
      ranges.erase(std::remove_if(ranges.begin(), ranges.end(), [](const auto& r) { return r.first == r.second; }),
                   ranges.end());
      std::sort(ranges.begin(), ranges.end());
      int64_t covered = 0;
      bool once = true;
      for (const auto& [start, stop] : ranges) {
        once = once && start == covered;
        covered = stop;
      }
      if (!once || covered != entry.shape[*entry.dim]) {
        fail(at + ": its pieces do not cover each range of [0, " + std::to_string(entry.shape[*entry.dim]) +
             ") along dim " + std::to_string(*entry.dim) + " once");
      }
    }
    result.tensors.emplace(name, std::move(entry));
  }
  return result;
}

} // namespace torch_mp::detail
