#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace torch_mp::detail {

// Names the torch_mp operator whose collectives run on this thread while the scope lives, for the
// errors they raise. The outermost scope wins: a layer's name tells the user more than the name of
// the conjugate op it calls. `op` must outlive the scope.
class OpScope {
 public:
  explicit OpScope(std::string_view op, bool backward = false);
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;

 private:
  bool outermost_;
};

// The operator named by this thread's OpScope ("torch_mp.gather_from_tp backward"), or `fallback`
// outside any: what checks and errors deep in the primitives call the operator the user called.
std::string scoped_op(std::string_view fallback);

// The backend's own timeout for `group`'s work on `device`, where torch_mp bounds waits itself.
std::optional<std::chrono::milliseconds> timeout_of(c10d::ProcessGroup& group, c10::DeviceType device);

// A collective in flight on `group`. wait() bounds it by the group's timeout and turns a timeout or
// a backend failure into a CollectiveError naming the operator (the innermost OpScope's or `op`),
// the collective, the group and this rank.
class Pending {
 public:
  Pending(
      std::string_view op,
      const char* collective,
      c10::intrusive_ptr<c10d::ProcessGroup> group,
      c10::DeviceType device,
      c10::intrusive_ptr<c10d::Work> work);
  void wait();

 private:
  std::string op_;
  const char* collective_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  c10::DeviceType device_;
  c10::intrusive_ptr<c10d::Work> work_;
  std::chrono::steady_clock::time_point start_;
};

// Starts an all-reduce (sum, or `op`) of `tensor` in place. Like the flat collectives below it hands
// the backend a view of its own: the backend's worker thread keeps the last collective's tensors
// until its next one, and a tensor Python has seen and dropped meanwhile would be released on that
// thread, which must then take the GIL (fatal during interpreter shutdown).
Pending start_all_reduce(
    std::string_view op,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    const at::Tensor& tensor,
    c10d::ReduceOp reduce_op = c10d::ReduceOp::SUM);

// The registry behind the start/wait pairs of primitive ops (the way c10d's functional collectives
// pair a collective with wait_tensor): a started collective is registered against the storage of the
// tensor it writes, and waiting on that tensor completes it. Weakly keyed: a tensor dropped
// without a wait leaves nothing behind once its storage is freed.
// start_pending starts the collective with `start` (which returns its Pending) unless one is already in
// flight on `tensor`'s storage (an error naming `op`), and registers it.
void start_pending(const at::Tensor& tensor, std::string_view op, const std::function<Pending()>& start);
// Waits for the collective registered against `tensor`'s storage (bounded as Pending::wait) and
// forgets it. False when none is registered.
bool wait_registered(const at::Tensor& tensor);

// Start the collectives below without waiting: all-gather of input into output ([group size,
// *input.shape]); a sum-reduce of `tensor` in place onto rank `root` (the other ranks' tensors are
// the backend's scratch afterwards). Both tensors contiguous. The decomposed ops of async TP
// (ops/async_tp.cpp) overlap them with matmuls.
Pending start_all_gather(
    std::string_view op,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    const at::Tensor& output,
    const at::Tensor& input);
Pending start_reduce(
    std::string_view op,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    const at::Tensor& tensor,
    int64_t root);

// output[r] = rank r's input, for output of shape [group size, *input.shape]; blocks until done.
void all_gather_into(
    std::string_view op,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    at::Tensor& output,
    at::Tensor& input);
// output = sum over ranks of input[this rank], for input of shape [group size, *output.shape].
void reduce_scatter_into(
    std::string_view op,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    at::Tensor& output,
    at::Tensor& input);

// Rank r receives rows [sum(input_splits[:r]), +input_splits[r]) of this rank's input and this rank's
// output holds, in rank order, output_splits[r] rows from rank r; both tensors are contiguous and a
// row is everything past dim 0. Blocks until done.
void all_to_all_into(
    std::string_view op,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    at::Tensor& output,
    at::Tensor& input,
    const std::vector<int64_t>& output_splits,
    const std::vector<int64_t>& input_splits);

// How a failed collective is thrown: CollectiveError by default. The Python module installs a
// thrower whose exception Python sees as torch_mp.CollectiveError, also when it is raised inside a
// backward pass, where no exception translator of ours runs.
using CollectiveErrorThrower = void (*)(const std::string& message);
void set_collective_error_thrower(CollectiveErrorThrower thrower);
// Throws `message` as the installed thrower does (CollectiveError in a C++ program).
[[noreturn]] void throw_collective_error(const std::string& message);

// A backend's error message without its source location ("[.../pair.cc:545] ") or backtrace: its
// first line, for the errors torch_mp raises in its place.
std::string backend_cause(const std::exception& error);

} // namespace torch_mp::detail
