// The bound torch_mp itself puts on a collective's wait: a backend that never answers gives a
// torch_mp::CollectiveError at the group's timeout.
#include <chrono>
#include <future>
#include <mutex>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/torch.h>
#include <torch_mp/torch_mp.h>

namespace {

// Work that completes only when the test releases it. c10d's Work::wait(timeout) gives up after
// `timeout`, wait() with no timeout waits for the release.
class NeverDone : public c10d::Work {
 public:
  void release() {
    finish();
  }
};

// A backend whose collectives never complete, with a 300 ms timeout in its options: whether a
// torch_mp collective on it returns depends on torch_mp bounding the wait, not on the backend.
class SilentBackend : public c10d::Backend {
 public:
  SilentBackend(int rank, int size, std::chrono::milliseconds timeout)
      : Backend(rank, size), options_(c10::make_intrusive<Options>("silent", timeout)) {}
  const std::string getBackendName() const override {
    return "silent";
  }
  c10::intrusive_ptr<Options> getBackendOptions() override {
    return options_;
  }
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>&, const c10d::AllreduceOptions&) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return works_.emplace_back(c10::make_intrusive<NeverDone>());
  }
  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& work : works_) {
      work->release();
    }
  }

 private:
  c10::intrusive_ptr<Options> options_;
  std::mutex mutex_;
  std::vector<c10::intrusive_ptr<NeverDone>> works_;
};

} // namespace

TEST(BoundedWait, CollectiveOnASilentBackendFailsAtTheGroupTimeout) {
  using namespace std::chrono_literals;
  const auto timeout = 300ms;
  auto backend = c10::make_intrusive<SilentBackend>(0, 2, timeout);
  auto group = c10::make_intrusive<c10d::ProcessGroup>(c10::make_intrusive<c10d::HashStore>(), 0, 2);
  group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::CUSTOM, backend);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::CUSTOM);
  group->setGroupName("silent_group");
  c10d::register_process_group("silent_group", group);
  const torch_mp::Group mp_group{"silent_group", 2, 0};

  const auto start = std::chrono::steady_clock::now();
  auto outcome = std::async(std::launch::async, [&]() -> std::string {
    try {
      torch_mp::primitives::all_reduce(torch::ones({4}), "sum", mp_group);
    } catch (const torch_mp::CollectiveError& error) {
      return error.what_without_backtrace();
    } catch (const std::exception& error) {
      return std::string("not a CollectiveError: ") + error.what();
    }
    return "returned";
  });
  // Far past the group's timeout: a wait that is not bounded is still in progress then.
  const bool ended = outcome.wait_for(20s) == std::future_status::ready;
  const std::chrono::duration<double> waited = std::chrono::steady_clock::now() - start;
  if (!ended) {
    backend->release_all(); // lets the unbounded wait end, so that the test can
  }
  const auto message = outcome.get();
  c10d::unregister_process_group("silent_group");
  ASSERT_TRUE(ended) << "the all_reduce on a backend that never answers still waited after 20 s; the group's "
                        "timeout is 0.3 s";
  EXPECT_GE(waited, timeout);
  EXPECT_NE(
      message.find("torch_mp.all_reduce: all_reduce on group 'silent_group' (rank 0 of 2) got no answer within 0.3 s: "
                   "a peer rank has died or did not reach this collective (custom: "),
      std::string::npos)
      << message;
}
