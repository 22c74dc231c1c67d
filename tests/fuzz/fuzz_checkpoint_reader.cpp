// libFuzzer target for what torch_mp::load reads before it trusts anything: a safetensors file's
// header (first input byte even) or a checkpoint index (odd). Either a c10::ValueError or a
// parsed result whose every byte range lies inside the file; anything else (a crash, another
// exception, a read outside the input, ASan's report of a bad access or a huge allocation) is a
// finding. Built and run by `make test-fuzz` (tests/fuzz/CMakeLists.txt).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include <c10/util/Exception.h>

#include "checkpoint/format.h"

namespace {

namespace fs = std::filesystem;

// An empty folder for the index's files to resolve in; the fuzzer never writes into it.
const fs::path& folder() {
  static const fs::path path = [] {
    auto made = fs::temp_directory_path() / ("torch_mp_fuzz_" + std::to_string(::getpid()));
    fs::create_directories(made / "inside");
    return made / "inside";
  }();
  return path;
}

void check(bool condition) {
  if (!condition) {
    std::abort();
  }
}

void fuzz_header(const uint8_t* data, size_t size) {
  const auto entries = torch_mp::detail::read_safetensors_header(
      "fuzz.safetensors", size, [&](void* out, uint64_t count, uint64_t offset) {
        check(offset <= size && count <= size - offset); // never a read outside the file
        std::memcpy(out, data + offset, count);
      });
  for (const auto& [name, entry] : entries) {
    check(entry.begin <= entry.end && entry.end <= size);
  }
}

void fuzz_index(const uint8_t* data, size_t size) {
  const auto index = torch_mp::detail::parse_checkpoint_index(
      folder(), "fuzz/torch_mp_checkpoint.json", std::string(reinterpret_cast<const char*>(data), size));
  const auto root = fs::canonical(folder());
  for (const auto& [name, entry] : index.tensors) {
    for (const auto& piece : entry.pieces) {
      const auto relative = piece.path.lexically_relative(root);
      check(!relative.empty() && *relative.begin() != ".."); // nothing outside the folder
    }
  }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) {
    return 0;
  }
  try {
    if (data[0] % 2 == 0) {
      fuzz_header(data + 1, size - 1);
    } else {
      fuzz_index(data + 1, size - 1);
    }
  } catch (const c10::ValueError&) {
    // a named error: the expected answer to a malformed input
  }
  return 0;
}
