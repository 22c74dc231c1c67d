#pragma once

// Runs a test body on two ranks as two threads of this process, each with its own Gloo group made
// by torch_mp::init_process_group over one shared store.
#include <chrono>
#include <functional>
#include <string>
#include <thread>

#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch_mp/torch_mp.h>

namespace torch_mp::testing {

inline void run_rank(int64_t rank, const std::string& name, c10::intrusive_ptr<c10d::Store> store,
                     const std::function<void(const Group&)>& body, std::chrono::milliseconds timeout) {
  try {
    ProcessGroupOptions options;
    options.rank = rank;
    options.world_size = 2;
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
inline void run_two_ranks(const std::string& name, const std::function<void(const Group&)>& body,
                          std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::thread second(run_rank, 1, name, store, std::cref(body), timeout);
  run_rank(0, name, store, body, timeout);
  second.join();
}

} // namespace torch_mp::testing
