// What every autograd Function over a process group does around its formulas: it saves the group
// for backward, names its operator in the errors of the collectives either direction runs, and
// (in forward) dispatches below autograd.
#pragma once

#include <string>

#include <torch/autograd.h>

#include <torch_mp/comm.h>

#include "comm/collectives.h"

namespace torch_mp::detail {

// Opened first in a forward: saves group_name and group_size in `ctx`, names `op` in collective
// errors and dispatches below autograd, both until it goes out of scope. `group` is the Group the
// forward's ops take (this rank's rank is looked up by the ops themselves).
class GroupForward {
 public:
  GroupForward(
      torch::autograd::AutogradContext* ctx,
      const char* op,
      c10::string_view group_name,
      int64_t group_size)
      : group{std::string(group_name), group_size, 0}, scope_(op) {
    ctx->saved_data["group_name"] = group.name;
    ctx->saved_data["group_size"] = group.size;
  }

  const Group group;

 private:
  OpScope scope_;
  at::AutoDispatchBelowADInplaceOrView below_autograd_;
};

// Opened first in a backward: the group its GroupForward saved, and `op` named ("<op> backward") in
// collective errors until it goes out of scope.
class GroupBackward {
 public:
  GroupBackward(torch::autograd::AutogradContext* ctx, const char* op)
      : group{ctx->saved_data["group_name"].toStringRef(), ctx->saved_data["group_size"].toInt(), 0},
        scope_(op, /*backward=*/true) {}

  const Group group;

 private:
  OpScope scope_;
};

} // namespace torch_mp::detail
