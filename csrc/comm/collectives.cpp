// The flat collectives under the primitive ops, in one place across PyTorch versions, and how they
// wait: never longer than the group's timeout, failing with an error that names who was waiting.
#include "comm/collectives.h"

#include <ATen/SavedTensorHooks.h>
#include <ATen/ThreadLocalPythonObjects.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/accumulate.h>

#include <iomanip>
#include <mutex>
#include <optional>
#include <sstream>
#include <unordered_map>

#include <torch_mp/comm.h>

namespace torch_mp::detail {
namespace {

thread_local std::string_view scope_op;
thread_local bool scope_backward = false;

[[noreturn]] void throw_default(const std::string& message) {
  throw CollectiveError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, message);
}

CollectiveErrorThrower thrower = &throw_default;

} // namespace

std::string backend_cause(const std::exception& error) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&error);
  std::string cause = c10_error ? c10_error->what_without_backtrace() : error.what();
  if (!cause.empty() && cause.front() == '[') {
    const auto end = cause.find("] ");
    cause = end == std::string::npos ? cause : cause.substr(end + 2);
  }
  return cause.substr(0, cause.find('\n'));
}

namespace {

std::string seconds(std::chrono::duration<double> duration) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(1) << duration.count() << " s";
  return out.str();
}

// A flat view of `tensor` for the backend, made below autograd so that it records no base: the
// backend's worker thread keeps the last collective's tensors until its next one, and the last
// reference it drops must not be a tensor Python has seen (its release would need the GIL, fatal
// while the interpreter shuts down). The view shares only the storage.
at::Tensor flat_view(const at::Tensor& tensor) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return tensor.view({-1});
}

// While alive, this thread's state holds no Python objects: c10d's work objects capture the
// thread-local state when a collective starts and are released on the backend's thread, where
// dropping a Python object needs the GIL, fatal once the interpreter is shutting down. (A backward
// pass stashes a Python context there in recent torch releases, and checkpointing its saved-tensor
// hooks.) The backend's thread runs no Python, so it needs none of them.
class NoPythonState {
 public:
  NoPythonState()
      : objects_(at::impl::ThreadLocalPythonObjects::get_state()),
        hooks_(at::SavedTensorDefaultHooks::get_tls_state()) {
    at::impl::ThreadLocalPythonObjects::set_state({});
    at::SavedTensorDefaultHooks::set_tls_state({});
  }
  ~NoPythonState() {
    at::impl::ThreadLocalPythonObjects::set_state(std::move(objects_));
    at::SavedTensorDefaultHooks::set_tls_state(hooks_);
  }
  NoPythonState(const NoPythonState&) = delete;
  NoPythonState& operator=(const NoPythonState&) = delete;

 private:
  at::impl::ThreadLocalPythonObjects objects_;
  at::impl::SavedTensorDefaultHooksTLS hooks_;
};

// Starts a collective (start() returns its c10d work) with no Python objects in this thread's state.
template <typename Start>
Pending start_collective(
    std::string_view op,
    const char* collective,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    c10::DeviceType device,
    Start start) {
  auto work = [&] {
    NoPythonState no_python;
    return start();
  }();
  return Pending(op, collective, group, device, std::move(work));
}

} // namespace

// The backend's own timeout for `group`; none where the wait must not be bounded here: NCCL work on
// a GPU completes asynchronously (a bounded wait would block the CPU until the GPU is done) and
// NCCL's watchdog enforces the same timeout. A backend too old to report its options bounds its
// collectives itself (Gloo does).
std::optional<std::chrono::milliseconds> timeout_of(c10d::ProcessGroup& group, c10::DeviceType device) {
  if (device != c10::DeviceType::CPU) {
    return std::nullopt;
  }
  try {
    return group.getBackend(device)->getBackendOptions()->timeout;
  } catch (const c10::Error&) {
    return std::nullopt;
  }
}

OpScope::OpScope(std::string_view op, bool backward) : outermost_(scope_op.empty()) {
  if (outermost_) {
    scope_op = op;
    scope_backward = backward;
  }
}

OpScope::~OpScope() {
  if (outermost_) {
    scope_op = {};
    scope_backward = false;
  }
}

std::string scoped_op(std::string_view fallback) {
  if (scope_op.empty()) {
    return std::string(fallback);
  }
  return std::string(scope_op) + (scope_backward ? " backward" : "");
}

Pending::Pending(
    std::string_view op,
    const char* collective,
    c10::intrusive_ptr<c10d::ProcessGroup> group,
    c10::DeviceType device,
    c10::intrusive_ptr<c10d::Work> work)
    : op_(scoped_op(op)),
      collective_(collective),
      group_(std::move(group)),
      device_(device),
      work_(std::move(work)),
      start_(std::chrono::steady_clock::now()) {}

void Pending::wait() {
  const auto timeout = timeout_of(*group_, device_);
  std::string cause;
  try {
    work_->wait(timeout.value_or(kNoTimeout));
    return;
  } catch (const std::exception& error) {
    cause = backend_cause(error);
  }
  const std::chrono::duration<double> waited = std::chrono::steady_clock::now() - start_;
  std::ostringstream message;
  message << op_ << ": " << collective_ << " on group '" << group_->getGroupName() << "' (";
  const auto& description = group_->getGroupDesc();
  if (!description.empty() && description != "undefined" && description != group_->getGroupName()) {
    message << description << ", ";
  }
  message << "rank " << group_->getRank() << " of " << group_->getSize() << ") ";
  if (timeout && waited >= *timeout) {
    message << "got no answer within " << seconds(*timeout)
            << ": a peer rank has died or did not reach this collective";
  } else {
    message << "failed after " << seconds(waited) << ": a peer rank has died or left the group";
  }
  message << " (" << group_->getBackendName() << ": " << cause << ")";
  thrower(message.str());
  TORCH_INTERNAL_ASSERT(false, "the collective error thrower returned");
}

void throw_collective_error(const std::string& message) {
  thrower(message);
  TORCH_INTERNAL_ASSERT(false, "the collective error thrower returned");
}

void set_collective_error_thrower(CollectiveErrorThrower new_thrower) {
  thrower = new_thrower ? new_thrower : &throw_default;
}

namespace {

struct Registered {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  Pending pending;
};

std::mutex registry_mutex;
// Keyed by the storage's address; the weak pointer tells a live entry from one whose storage was
// freed (and whose address may have been reused).
std::unordered_map<const c10::StorageImpl*, Registered> registry;

} // namespace

void start_pending(const at::Tensor& tensor, std::string_view op, const std::function<Pending()>& start) {
  const auto* key = tensor.storage().unsafeGetStorageImpl();
  std::lock_guard<std::mutex> lock(registry_mutex);
  for (auto it = registry.begin(); it != registry.end();) {
    it = it->second.storage.expired() ? registry.erase(it) : std::next(it);
  }
  TORCH_CHECK(
      registry.count(key) == 0, op,
      ": a collective is already in flight on this tensor's storage; wait on it before starting another");
  registry.emplace(key, Registered{tensor.storage().getWeakStorageImpl(), start()});
}

bool wait_registered(const at::Tensor& tensor) {
  std::optional<Pending> pending;
  {
    const auto* key = tensor.storage().unsafeGetStorageImpl();
    std::lock_guard<std::mutex> lock(registry_mutex);
    const auto it = registry.find(key);
    if (it == registry.end()) {
      return false;
    }
    if (!it->second.storage.expired()) {
      pending.emplace(std::move(it->second.pending));
    }
    registry.erase(it);
  }
  if (pending) {
    pending->wait();
  }
  return pending.has_value();
}

Pending start_all_reduce(
    std::string_view op,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    const at::Tensor& tensor,
    c10d::ReduceOp reduce_op) {
  std::vector<at::Tensor> tensors{flat_view(tensor)};
  c10d::AllreduceOptions options;
  options.reduceOp = reduce_op;
  return start_collective(
      op, "all_reduce", group, tensor.device().type(), [&] { return group->allreduce(tensors, options); });
}

Pending start_reduce(
    std::string_view op,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    const at::Tensor& tensor,
    int64_t root) {
  std::vector<at::Tensor> tensors{flat_view(tensor)};
  c10d::ReduceOptions options;
  options.reduceOp = c10d::ReduceOp::SUM;
  options.rootRank = root;
  return start_collective(
      op, "reduce", group, tensor.device().type(), [&] { return group->reduce(tensors, options); });
}

// c10d's flat all-gather, reduce-scatter and all-to-all carry deprecation notes in recent releases; their
// replacements do not exist in the oldest releases we support, and the flat forms are what the
// backends implement natively.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

// Both run on flat views (views of their own, see start_all_reduce): backends split the larger
// buffer into group-size pieces along dim 0.
Pending start_all_gather(
    std::string_view op,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    const at::Tensor& output,
    const at::Tensor& input) {
  auto flat_output = flat_view(output);
  auto flat_input = flat_view(input);
  return start_collective(op, "all_gather", group, input.device().type(), [&] {
    return group->_allgather_base(flat_output, flat_input);
  });
}

void all_gather_into(
    std::string_view op,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    at::Tensor& output,
    at::Tensor& input) {
  start_all_gather(op, group, output, input).wait();
}

void reduce_scatter_into(
    std::string_view op,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    at::Tensor& output,
    at::Tensor& input) {
  auto flat_output = flat_view(output);
  auto flat_input = flat_view(input);
  start_collective(op, "reduce_scatter", group, input.device().type(), [&] {
    return group->_reduce_scatter_base(flat_output, flat_input);
  }).wait();
}

// On flat views like the others: the split sizes, counted in rows, become counts of elements.
void all_to_all_into(
    std::string_view op,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    at::Tensor& output,
    at::Tensor& input,
    const std::vector<int64_t>& output_splits,
    const std::vector<int64_t>& input_splits) {
  const auto row = c10::multiply_integers(input.sizes().slice(1));
  std::vector<int64_t> output_counts, input_counts;
  for (const auto rows : output_splits) output_counts.push_back(rows * row);
  for (const auto rows : input_splits) input_counts.push_back(rows * row);
  auto flat_output = flat_view(output);
  auto flat_input = flat_view(input);
  start_collective(op, "all_to_all", group, input.device().type(), [&] {
    return group->alltoall_base(flat_output, flat_input, output_counts, input_counts);
  }).wait();
}

#pragma GCC diagnostic pop

} // namespace torch_mp::detail
