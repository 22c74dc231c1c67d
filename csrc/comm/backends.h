#pragma once

#include <chrono>
#include <string>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace torch_mp::detail {

// Creates PyTorch's c10d backend `backend` ("gloo" or "nccl") for `group` and attaches it.
void attach_backend(
    c10d::ProcessGroup& group,
    const c10::intrusive_ptr<c10d::Store>& store,
    const std::string& backend,
    std::chrono::milliseconds timeout);

} // namespace torch_mp::detail
