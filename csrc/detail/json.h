#pragma once

// The little JSON the checkpoint index needs (LibTorch ships no JSON library): a value tree, a
// parser that accepts what Python's json module writes, and the two writers the index uses.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <c10/util/ArrayRef.h>

namespace torch_mp::detail {

struct Json {
  enum class Kind { Null, Bool, Number, String, Array, Object } kind = Kind::Null;
  std::string text; // a string's value; a number, true or false as written
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;

  const Json* find(const std::string& key) const {
    for (const auto& [name, value] : members) {
      if (name == key) {
        return &value;
      }
    }
    return nullptr;
  }
  // The member `key`; a c10::ValueError naming it when there is none.
  const Json& at(const std::string& key) const;
  int64_t integer() const;
};

// Parses `text`; malformed JSON is a c10::ValueError naming the offset.
Json parse_json(const std::string& text);
// `text` as a JSON string, quotes and escapes included.
std::string quoted(const std::string& text);
// `values` as a JSON list of integers.
std::string json_list(c10::IntArrayRef values);

} // namespace torch_mp::detail
