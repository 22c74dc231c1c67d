#pragma once

#include <chrono>
#include <optional>
#include <string>

#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace torch_mp {

// A collective that did not complete: no answer within the group's timeout, or the backend failed
// (a peer rank died, a connection closed). The message names the torch_mp operator, the collective,
// the group and this rank; the group is not usable afterwards. In a Python process the same failure
// is raised as torch_mp.CollectiveError instead (a torch.distributed.DistBackendError), which this
// C++ type cannot be.
class CollectiveError : public c10::DistBackendError {
 public:
  using c10::DistBackendError::DistBackendError;
};

// A process group as the operators see it: its name in c10d's group registry, its size (world),
// and this process's rank in it. A group of size 1 needs no registered process group at all. The
// operators look the group up by name when they run (c10::ValueError when none is registered under
// the name, or it has another size).
struct Group {
  std::string name;
  int64_t size = 1;
  int64_t rank = 0;

  // The registered c10d group called `name` (Python: ProcessGroup.group_name), with its size and
  // this process's rank. c10::ValueError when no group of that name is registered in this process.
  static Group named(const std::string& name);
  // A group of one: every operator is a local computation.
  static Group single() {
    return Group{};
  }
};

struct ProcessGroupOptions {
  // "gloo" (CPU tensors, and CUDA tensors staged through the host) or "nccl" (CUDA tensors).
  std::string backend = "gloo";
  // rank and world size; unset: RANK and WORLD_SIZE from the environment (torchrun sets them).
  std::optional<int64_t> rank;
  std::optional<int64_t> world_size;
  // The rendezvous; unset: a TCPStore at MASTER_ADDR:MASTER_PORT, served by rank 0.
  c10::intrusive_ptr<c10d::Store> store;
  // Bound on every collective; an unanswered collective fails after this long instead of hanging.
  std::chrono::milliseconds timeout = std::chrono::minutes(10);
  // The name the group is registered under (what Group::named and the operators look up).
  std::string group_name = "torch_mp_default";
  // The key under which the ranks meet in the store; empty: group_name. Ranks that share a
  // process (threads) register different group names and meet under one prefix.
  std::string store_prefix;
};

// Creates a c10d process group with PyTorch's own Gloo or NCCL backend, registers it under
// options.group_name and returns it as a Group: what a LibTorch program started by
// `torchrun --no-python ./app` calls first. Blocks until every rank has joined the rendezvous
// (bounded by options.timeout). Errors: c10::ValueError when RANK/WORLD_SIZE or MASTER_ADDR/
// MASTER_PORT are needed and unset, the rank is outside [0, world size), a group of that name exists
// already, or the backend is unknown; c10::Error when this build lacks the backend (Gloo's headers,
// or CUDA for NCCL).
Group init_process_group(const ProcessGroupOptions& options = {});

// Unregisters and shuts down a group made by init_process_group; collectives on it fail afterwards.
// c10::ValueError when `group` was not made by init_process_group (or was destroyed already).
void destroy_process_group(const Group& group);

// The groups of a 2-D mesh of pp x tp ranks, tensor parallel innermost as Megatron-LM orders them
// (and Python's torch_mp.init_mesh): rank = pp_index * tp + tp_index. `pp` joins the ranks with this
// rank's tp_index (rank in it: pp_index), the pipeline's group; `tp` those with its pp_index (rank in
// it: tp_index), the group of the stage's tensor-parallel layers. With 4 ranks and pp 2 x tp 2: tp
// groups {0, 1} {2, 3}, pp groups {0, 2} {1, 3}. A dim of size 1 is Group::single().
struct Mesh {
  Group pp;
  Group tp;
};

// Makes the mesh's groups over one rendezvous, what a LibTorch program under `torchrun
// --nproc-per-node 4` calls before torch_mp::tensor_parallel(model, plan, mesh.tp) and
// torch_mp::pipeline_parallel(model, mesh.pp). `options` as for init_process_group, for the whole
// world (rank, world size, store, timeout, backend); the groups are registered as
// options.group_name + "/pp" and "/tp" (destroy each with destroy_process_group). Errors:
// c10::ValueError naming pp and tp when either is < 1 or pp * tp is not the world size, and those of
// init_process_group.
Mesh init_mesh(int64_t pp, int64_t tp, const ProcessGroupOptions& options = {});

} // namespace torch_mp
