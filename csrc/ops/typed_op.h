// The dispatcher handle every typed entry point (torch_mp::<op>, torch_mp::primitives::<name>)
// calls its operator through.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace torch_mp::detail {

// The typed handle of the registered operator `name` ("torch_mp::<op>"), whose C++ signature is
// `Signature`; each entry point looks it up once, into a function-local static.
template <class Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

} // namespace torch_mp::detail
