#include "comm/group.h"

#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch_mp/comm.h>

#include "comm/backends.h"

namespace torch_mp {
namespace detail {

namespace {

c10::intrusive_ptr<c10d::ProcessGroup> lookup_group(std::string_view op, std::string_view group_name) {
  try {
    return c10d::resolve_process_group(std::string(group_name));
  } catch (const c10::Error&) {
    TORCH_CHECK_VALUE(
        false, op, ": no process group named '", group_name,
        "' is registered in this process (never made, or destroyed); expected a group made by "
        "torch.distributed (init_process_group / new_group) or torch_mp::init_process_group");
  }
}

} // namespace

c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(
    std::string_view op,
    std::string_view group_name,
    int64_t group_size) {
  TORCH_CHECK_VALUE(group_size >= 1, op, ": group_size is ", group_size, "; expected at least 1");
  auto group = lookup_group(op, group_name);
  TORCH_CHECK_VALUE(
      group->getSize() == group_size, op, ": process group '", group_name, "' has ",
      group->getSize(), " members but group_size is ", group_size);
  return group;
}

} // namespace detail

Group Group::named(const std::string& name) {
  auto group = detail::lookup_group("Group::named", name);
  return Group{name, group->getSize(), group->getRank()};
}

namespace {

// c10d's registry holds groups weakly; the groups made here live until destroy_process_group.
std::mutex owned_groups_mutex;
std::unordered_map<std::string, c10::intrusive_ptr<c10d::ProcessGroup>> owned_groups;

int64_t env_int(const char* name, std::optional<int64_t> given) {
  if (given) {
    return *given;
  }
  const char* value = std::getenv(name);
  TORCH_CHECK_VALUE(
      value != nullptr, "init_process_group: ", name,
      " is not set; expected it in the environment (torchrun sets it) or in ProcessGroupOptions");
  return std::stoll(value);
}

// A TCPStore at MASTER_ADDR:MASTER_PORT, served by `rank` 0 unless torchrun's agent serves it.
c10::intrusive_ptr<c10d::Store> torchrun_store(const char* op, int64_t rank, int64_t world_size,
                                               std::chrono::milliseconds timeout) {
  const char* addr = std::getenv("MASTER_ADDR");
  const char* port = std::getenv("MASTER_PORT");
  TORCH_CHECK_VALUE(
      addr && port, op, ": MASTER_ADDR and MASTER_PORT are not set; expected them "
      "in the environment (torchrun sets them) or a store in ProcessGroupOptions");
  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<std::uint16_t>(std::stoi(port));
  // Under torchrun the agent serves the store already; rank 0 then joins it as a client.
  const char* agent_store = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
  const bool agent_serves = agent_store && (std::string(agent_store) == "True" || std::string(agent_store) == "1");
  store_options.isServer = rank == 0 && !agent_serves;
  store_options.numWorkers = static_cast<std::size_t>(world_size);
  store_options.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>(addr, store_options);
}

} // namespace

Group init_process_group(const ProcessGroupOptions& options) {
  const auto rank = env_int("RANK", options.rank);
  const auto world_size = env_int("WORLD_SIZE", options.world_size);
  TORCH_CHECK_VALUE(
      world_size >= 1 && rank >= 0 && rank < world_size, "init_process_group: rank ", rank,
      " and world size ", world_size, "; expected 0 <= rank < world size");
  auto store = options.store ? options.store : torchrun_store("init_process_group", rank, world_size, options.timeout);
  auto group_store = c10::make_intrusive<c10d::PrefixStore>(
      options.store_prefix.empty() ? options.group_name : options.store_prefix, store);
  auto group = c10::make_intrusive<c10d::ProcessGroup>(group_store, rank, world_size);
  detail::attach_backend(*group, group_store, options.backend, options.timeout);
  group->setGroupName(options.group_name);
  {
    std::lock_guard<std::mutex> lock(owned_groups_mutex);
    TORCH_CHECK_VALUE(
        owned_groups.count(options.group_name) == 0, "init_process_group: a group named '", options.group_name,
        "' exists already; expected a new group_name or destroy_process_group first");
    owned_groups[options.group_name] = group;
  }
  c10d::register_process_group(options.group_name, group);
  return Group{options.group_name, world_size, rank};
}

void destroy_process_group(const Group& group) {
  if (group.size == 1 && group.name.empty()) {
    return;
  }
  c10::intrusive_ptr<c10d::ProcessGroup> process_group;
  {
    std::lock_guard<std::mutex> lock(owned_groups_mutex);
    auto found = owned_groups.find(group.name);
    TORCH_CHECK_VALUE(
        found != owned_groups.end(), "destroy_process_group: no group named '", group.name,
        "' was made by torch_mp::init_process_group");
    process_group = found->second;
    owned_groups.erase(found);
  }
  c10d::unregister_process_group(group.name);
  process_group->shutdown();
}

Mesh init_mesh(int64_t pp, int64_t tp, const ProcessGroupOptions& options) {
  TORCH_CHECK_VALUE(pp >= 1, "init_mesh: pp = ", pp, "; expected an int >= 1");
  TORCH_CHECK_VALUE(tp >= 1, "init_mesh: tp = ", tp, "; expected an int >= 1");
  const auto rank = env_int("RANK", options.rank);
  const auto world_size = env_int("WORLD_SIZE", options.world_size);
  TORCH_CHECK_VALUE(
      pp * tp == world_size, "init_mesh: pp=", pp, " x tp=", tp, " = ", pp * tp, " ranks but the world has ",
      world_size, "; expected pp * tp == world size");
  TORCH_CHECK_VALUE(
      rank >= 0 && rank < world_size, "init_mesh: rank ", rank, " and world size ", world_size,
      "; expected 0 <= rank < world size");
  auto store = options.store ? options.store : torchrun_store("init_mesh", rank, world_size, options.timeout);
  const auto prefix = options.store_prefix.empty() ? options.group_name : options.store_prefix;
  const auto pp_index = rank / tp, tp_index = rank % tp;
  // One dim's group: this rank's row of the mesh along it, meeting under a key of its own.
  auto make = [&](const char* dim, int64_t size, int64_t index, int64_t row) {
    if (size == 1) {
      return Group::single();
    }
    ProcessGroupOptions sub = options;
    sub.rank = index;
    sub.world_size = size;
    sub.store = store;
    sub.group_name = options.group_name + "/" + dim;
    sub.store_prefix = prefix + "/" + dim + std::to_string(row);
    return init_process_group(sub);
  };
  Mesh mesh;
  mesh.pp = make("pp", pp, pp_index, tp_index);
  mesh.tp = make("tp", tp, tp_index, pp_index);
  return mesh;
}

} // namespace torch_mp
