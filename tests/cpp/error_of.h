#pragma once

// What the tests share: the message of the c10::ValueError a call raises.
#include <string>

#include <c10/util/Exception.h>

template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const c10::ValueError& error) {
    return error.what();
  }
  return "no error";
}
