#pragma once

// Runs a test body on two (or more) ranks as threads of this process, each with its own Gloo group
// made by torch_mp::init_process_group over one shared store.
#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch_mp/torch_mp.h>

namespace torch_mp::testing {

inline void run_rank(int64_t rank, int64_t world_size, const std::string& name, c10::intrusive_ptr<c10d::Store> store,
                     const std::function<void(const Group&)>& body, std::chrono::milliseconds timeout) {
  try {
    ProcessGroupOptions options;
    options.rank = rank;
    options.world_size = world_size;
    options.store = std::move(store);
    options.group_name = name + "_rank" + std::to_string(rank);
    options.store_prefix = name;
    options.timeout = timeout;
    const auto group = init_process_group(options);
    body(group);
    destroy_process_group(group);
  } catch (const std::exception& error) {
    // An exception escaping a thread would end the whole test binary: report it as a failure.
    ADD_FAILURE() << "rank " << rank << ": " << error.what();
  }
}

// `timeout` bounds every collective of the groups.
inline void run_ranks(int64_t world_size, const std::string& name, const std::function<void(const Group&)>& body,
                      std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::thread> others;
  for (int64_t rank = 1; rank < world_size; ++rank) {
    others.emplace_back(run_rank, rank, world_size, name, store, std::cref(body), timeout);
  }
  run_rank(0, world_size, name, store, body, timeout);
  for (auto& thread : others) {
    thread.join();
  }
}

inline void run_two_ranks(const std::string& name, const std::function<void(const Group&)>& body,
                          std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  run_ranks(2, name, body, timeout);
}

// Runs `body` on pp x tp ranks as threads, each with its Mesh (torch_mp::init_mesh over one store).
inline void run_mesh(int64_t pp, int64_t tp, const std::string& name, const std::function<void(const Mesh&)>& body,
                     std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  auto run = [&](int64_t rank) {
    try {
      ProcessGroupOptions options;
      options.rank = rank;
      options.world_size = pp * tp;
      options.store = store;
      options.group_name = name + "_rank" + std::to_string(rank);
      options.store_prefix = name;
      options.timeout = timeout;
      const auto mesh = init_mesh(pp, tp, options);
      body(mesh);
      destroy_process_group(mesh.pp);
      destroy_process_group(mesh.tp);
    } catch (const std::exception& error) {
      ADD_FAILURE() << "rank " << rank << ": " << error.what();
    }
  };
  std::vector<std::thread> others;
  for (int64_t rank = 1; rank < pp * tp; ++rank) {
    others.emplace_back(run, rank);
  }
  run(0);
  for (auto& thread : others) {
    thread.join();
  }
}

} // namespace torch_mp::testing
