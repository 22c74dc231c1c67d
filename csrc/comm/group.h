#pragma once

#include <string_view>

#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace torch_mp::detail {

// The registered c10d group `group_name`, checked to have `group_size` members. `op` names the
// operator in the error raised when there is no such group or its size differs.
c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(
    std::string_view op,
    std::string_view group_name,
    int64_t group_size);

} // namespace torch_mp::detail
