// The c10d backends come from libtorch itself. c10d's Gloo header needs Gloo's headers, which the
// torch wheel does not ship: the build takes them from Debian's libgloo-dev when they are there
// (TORCH_MP_WITH_GLOO; headers only: the Gloo code that runs is the one compiled into libtorch_cpu,
// reached through c10d's classes). Without them, C++ programs cannot create Gloo groups here.
#include "comm/backends.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#ifdef TORCH_MP_WITH_GLOO
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif

#ifdef TORCH_MP_WITH_NCCL
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace torch_mp::detail {

void attach_backend(
    c10d::ProcessGroup& group,
    const c10::intrusive_ptr<c10d::Store>& group_store,
    const std::string& backend,
    std::chrono::milliseconds timeout) {
  [[maybe_unused]] auto store = c10::make_intrusive<c10d::PrefixStore>(backend, group_store);
  if (backend == "gloo") {
#ifdef TORCH_MP_WITH_GLOO
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, group.getRank(), group.getSize(), options);
    group.setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    group.setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
    group.setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::GLOO, gloo);
    return;
#else
    TORCH_CHECK(
        false, "init_process_group: backend 'gloo' is not available: this torch_mp was built without "
        "Gloo's headers (gloo/context.h), which creating Gloo groups from C++ needs; install them "
        "(Debian/Ubuntu: apt-get install libgloo-dev) and rebuild torch_mp. Python programs are not "
        "affected: their Gloo groups come from torch.distributed.init_process_group");
#endif
  }
#ifdef TORCH_MP_WITH_NCCL
  if (backend == "nccl") {
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, group.getRank(), group.getSize(), options);
    group.setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
    group.setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
    return;
  }
#endif
  TORCH_CHECK_VALUE(
      false, "init_process_group: backend '", backend, "' is not available; expected 'gloo'",
#ifdef TORCH_MP_WITH_NCCL
      " or 'nccl'"
#else
      " ('nccl' needs a CUDA build of torch_mp)"
#endif
  );
}

} // namespace torch_mp::detail
