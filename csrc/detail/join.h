#pragma once

#include <sstream>
#include <string>
#include <vector>

namespace torch_mp::detail {

// "[a, b, c]": a list of values for an error message, each written with operator<<.
template <typename T>
std::string join(const std::vector<T>& values) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < values.size(); ++i) {
    out << (i ? ", " : "") << values[i];
  }
  out << "]";
  return out.str();
}

} // namespace torch_mp::detail
