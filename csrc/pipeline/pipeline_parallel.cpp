// torch_mp::pipeline_parallel: a torch::nn::Sequential as a pipeline across the ranks of a group,
// activations and gradients over c10d send/recv, the schedules of schedule.cpp.
#include <torch_mp/pipeline_parallel.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <sstream>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch_mp/training.h>

#include "checkpoint/sharded.h"
#include "comm/collectives.h"
#include "comm/group.h"
#include "detail/join.h"
#include "detail/stage.h"
#include "nn/parallel_group.h"

namespace torch_mp {
namespace {

using detail::join;

constexpr const char* kOp = "pipeline_parallel";

// The dtypes a message carries, by their index in the header (Python's transport uses the same).
const std::vector<at::ScalarType>& message_dtypes() {
  static const std::vector<at::ScalarType> dtypes = {
      at::kFloat, at::kHalf, at::kBFloat16, at::kDouble, at::kLong, at::kInt, at::kShort, at::kChar, at::kByte,
      at::kBool};
  return dtypes;
}

constexpr int64_t kHeaderSlots = 32;
constexpr int64_t kActivation = 0, kGradient = 1, kAbort = 2;

// (kind, micro-batch, stage that made the tensor, stage that uses it)
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t>;

std::string describe(const Key& key, int64_t peer) {
  const auto [kind, micro_batch, made_by, used_by] = key;
  std::ostringstream out;
  if (kind == kActivation) {
    out << "the activations of micro-batch " << micro_batch << " for stage " << used_by << " from rank " << peer;
  } else {
    out << "the gradients of micro-batch " << micro_batch << " for stage " << used_by << " from rank " << peer;
  }
  return out.str();
}

// A peer's failure, told to this rank by an abort message: raised as the peer's error was.
struct PeerStopped {
  int64_t rank;
  bool value_error;
  std::string message;
};

// One tensor per message over c10d send/recv, each preceded by a header (its key, dtype, whether it
// requires grad, its shape) so that a receiver reads a peer's messages in the order sent (tags
// number them) and keeps those it does not need yet. A message to this rank itself (consecutive
// stages on one rank) goes straight to the inbox. Every wait is bounded by `timeout`.
class Transport {
 public:
  Transport(c10::intrusive_ptr<c10d::ProcessGroup> group, const Group& info, c10::Device device,
            std::chrono::milliseconds timeout)
      : group_(std::move(group)), info_(info), device_(device), timeout_(timeout) {}

  void send(int64_t dst, const Key& key, const at::Tensor& tensor) {
    if (dst == info_.rank) {
      inbox_[{dst, key}] = tensor.detach().requires_grad_(tensor.requires_grad() && std::get<0>(key) == kActivation);
      return;
    }
    const auto& dtypes = message_dtypes();
    const auto dtype = std::find(dtypes.begin(), dtypes.end(), tensor.scalar_type());
    TORCH_CHECK_VALUE(
        dtype != dtypes.end(), kOp, ": a ", tensor.scalar_type(), " tensor passes from stage ", std::get<2>(key),
        " to stage ", std::get<3>(key), "; expected one of ", join(dtypes));
    TORCH_CHECK_VALUE(
        tensor.dim() <= kHeaderSlots - 8, kOp, ": a tensor of ", tensor.dim(), " dims passes from stage ",
        std::get<2>(key), " to stage ", std::get<3>(key), "; expected at most ", kHeaderSlots - 8);
    std::vector<int64_t> values = {std::get<0>(key), std::get<1>(key), std::get<2>(key), std::get<3>(key), 0,
                                   dtype - dtypes.begin(), tensor.requires_grad(), tensor.dim()};
    for (const auto size : tensor.sizes()) {
      values.push_back(size);
    }
    values.resize(kHeaderSlots, 0);
    post_send(dst, header(values));
    post_send(dst, tensor.detach().contiguous());
  }

  // The tensor of message `key` from rank `src`; an activation is a leaf that requires grad when
  // the sender's tensor did. `wait` records the time spent waiting (a Recorder's recv-wait).
  template <typename Record>
  at::Tensor recv(int64_t src, const Key& key, Record record) {
    auto found = inbox_.find({src, key});
    if (found == inbox_.end()) {
      // A checked schedule runs a stage's producer on this rank before its consumer.
      TORCH_INTERNAL_ASSERT(src != info_.rank, kOp, ": rank ", info_.rank, " waits for itself: ", describe(key, src));
      record([&] {
        while (inbox_.count({src, key}) == 0) {
          const auto doing = "receiving " + describe(key, src);
          auto head = at::empty({kHeaderSlots}, at::TensorOptions().dtype(at::kLong).device(device_));
          wait(post_recv(src, head, doing), doing);
          const auto values = head.to(at::kCPU);
          const auto* v = values.data_ptr<int64_t>();
          const Key got{v[0], v[1], v[2], v[3]};
          if (v[0] == kAbort) {
            auto text = at::empty({v[8]}, at::TensorOptions().dtype(at::kByte).device(device_));
            wait(post_recv(src, text, doing), doing);
            const auto bytes = text.to(at::kCPU);
            throw PeerStopped{src, v[5] == 1,
                              std::string(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), bytes.numel())};
          }
          TORCH_CHECK(v[5] >= 0 && v[5] < static_cast<int64_t>(message_dtypes().size()) && v[7] >= 0 &&
                          v[7] <= kHeaderSlots - 8,
                      kOp, ": rank ", info_.rank, " got a malformed header from rank ", src);
          auto buffer = at::empty(c10::IntArrayRef(v + 8, v[7]),
                                  at::TensorOptions().dtype(message_dtypes()[v[5]]).device(device_));
          wait(post_recv(src, buffer, doing), doing);
          inbox_[{src, got}] = buffer.requires_grad_(v[6] != 0 && v[0] == kActivation);
        }
      });
      found = inbox_.find({src, key});
    }
    auto tensor = std::move(found->second);
    inbox_.erase(found);
    return tensor;
  }

  // Waits for every send posted to complete.
  void finish() {
    auto pending = std::move(pending_);
    pending_.clear();
    for (auto& [work, tensor, dst] : pending) {
      wait(work, "sending to rank " + std::to_string(dst));
    }
  }

  // After a failure: tells every other rank but `except` (best effort: nothing is awaited) that this
  // rank stopped the step, so that those waiting for its messages raise instead of timing out. The
  // sends still in flight are kept until the process ends, never awaited: the backend may still
  // write from their buffers.
  void abort(const std::string& message, bool value_error, int64_t except) {
    std::string text = message.substr(0, 4000);
    if (text.empty()) {
      text = "(no message)";
    }
    for (int64_t peer = 0; peer < info_.size; ++peer) {
      if (peer == info_.rank || peer == except) {
        continue;
      }
      std::vector<int64_t> values = {kAbort, 0, 0, 0, 0, value_error ? 1 : 0, 0, 0, static_cast<int64_t>(text.size())};
      values.resize(kHeaderSlots, 0);
      auto bytes = at::empty({static_cast<int64_t>(text.size())}, at::kByte);
      std::memcpy(bytes.data_ptr(), text.data(), text.size());
      try {
        post_send(peer, header(values));
        post_send(peer, bytes.to(device_));
      } catch (const std::exception&) {
        // The peer may be gone already: nothing more to tell it.
      }
    }
    static std::mutex mutex;
    static auto* abandoned = new std::vector<Sent>(); // never freed: see above
    std::lock_guard<std::mutex> lock(mutex);
    for (auto& entry : pending_) {
      abandoned->push_back(std::move(entry));
    }
    pending_.clear();
    inbox_.clear();
  }

  // `tensor` (defined on rank `root` only) on every rank: its header (dtype, shape) then its
  // values broadcast from root, each wait bounded by the timeout.
  at::Tensor broadcast(const at::Tensor& tensor, int64_t root) {
    if (info_.size == 1) {
      return tensor;
    }
    const auto doing = "receiving the pipeline's output from rank " + std::to_string(root);
    std::vector<int64_t> values(kHeaderSlots, 0);
    if (info_.rank == root) {
      const auto& dtypes = message_dtypes();
      const auto dtype = std::find(dtypes.begin(), dtypes.end(), tensor.scalar_type());
      TORCH_CHECK_VALUE(dtype != dtypes.end() && tensor.dim() <= kHeaderSlots - 8, kOp, ": the output is a ",
                        tensor.scalar_type(), " tensor of ", tensor.dim(), " dims; expected one of ", join(dtypes),
                        " with at most ", kHeaderSlots - 8, " dims");
      values[5] = dtype - dtypes.begin();
      values[7] = tensor.dim();
      std::copy(tensor.sizes().begin(), tensor.sizes().end(), values.begin() + 8);
    }
    auto head = header(values);
    post_broadcast(head, root, doing);
    const auto got = head.to(at::kCPU);
    const auto* v = got.data_ptr<int64_t>();
    auto out = info_.rank == root ? tensor.contiguous()
                                  : at::empty(c10::IntArrayRef(v + 8, v[7]),
                                              at::TensorOptions().dtype(message_dtypes()[v[5]]).device(device_));
    post_broadcast(out, root, doing);
    return out;
  }

  std::string where() const {
    return "rank " + std::to_string(info_.rank) + " of " + std::to_string(info_.size) + " in group '" +
           info_.name + "'";
  }

 private:
  at::Tensor header(const std::vector<int64_t>& values) const {
    return at::tensor(values, at::kLong).to(device_);
  }

  int tag(std::map<int64_t, int>& sequence, int64_t peer) {
    return ++sequence[peer];
  }

  void post_send(int64_t dst, at::Tensor tensor) {
    std::vector<at::Tensor> tensors{tensor};
    c10::intrusive_ptr<c10d::Work> work;
    try {
      work = group_->send(tensors, static_cast<int>(dst), tag(sequence_out_, dst));
    } catch (const std::exception& error) {
      failed("sending to rank " + std::to_string(dst), error);
    }
    pending_.emplace_back(std::move(work), std::move(tensor), dst);
  }

  c10::intrusive_ptr<c10d::Work> post_recv(int64_t src, at::Tensor& buffer, const std::string& doing) {
    std::vector<at::Tensor> tensors{buffer};
    try {
      return group_->recv(tensors, static_cast<int>(src), tag(sequence_in_, src));
    } catch (const std::exception& error) {
      failed(doing, error);
    }
  }

  void post_broadcast(at::Tensor& tensor, int64_t root, const std::string& doing) {
    std::vector<at::Tensor> tensors{tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    c10::intrusive_ptr<c10d::Work> work;
    try {
      work = group_->broadcast(tensors, options);
    } catch (const std::exception& error) {
      failed(doing, error);
    }
    wait(work, doing);
  }

  [[noreturn]] void failed(const std::string& doing, const std::exception& error) const {
    detail::throw_collective_error(std::string("torch_mp::") + kOp + ": " + where() + " failed " + doing +
                                   ": a peer rank has died or left the group (" + group_->getBackendName() + ": " +
                                   detail::backend_cause(error) + ")");
  }

  void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& doing) const {
    const auto start = std::chrono::steady_clock::now();
    bool completed = false;
    try {
      completed = work->wait(timeout_);
    } catch (const std::exception& error) {
      // Gloo reports its timeout as an error too: what tells them apart is the time waited.
      if (std::chrono::steady_clock::now() - start < timeout_ * 95 / 100) {
        failed(doing, error);
      }
    }
    if (!completed) {
      std::ostringstream message;
      message << "torch_mp::" << kOp << ": " << where() << " got no answer within "
              << std::chrono::duration<double>(timeout_).count() << " s " << doing
              << ": a peer rank has died or runs a different schedule";
      detail::throw_collective_error(message.str());
    }
  }

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  Group info_;
  c10::Device device_;
  std::chrono::milliseconds timeout_;
  std::map<int64_t, int> sequence_out_, sequence_in_;
  std::map<std::pair<int64_t, Key>, at::Tensor> inbox_;
  using Sent = std::tuple<c10::intrusive_ptr<c10d::Work>, at::Tensor, int64_t>;
  std::vector<Sent> pending_;
};

// Every rank's `row`, [group size, row length]; the row itself on a group of one.
// `device`: where the backend takes its tensors (the CPU for Gloo).
at::Tensor gather_rows(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const Group& info, c10::Device device,
                       const std::vector<int64_t>& row) {
  auto mine = at::tensor(row, at::kLong);
  if (info.size == 1) {
    return mine.unsqueeze(0);
  }
  mine = mine.to(device);
  auto all = at::empty({info.size, static_cast<int64_t>(row.size())}, mine.options());
  detail::all_gather_into(std::string("torch_mp::") + kOp, group, all, mine);
  return all.to(at::kCPU);
}

// c10::ValueError naming each field whose value differs between ranks, with every rank's value
// (show(column, row)). fields[c] names column c; a column with an empty name belongs to the named
// one before it (a shape's sizes).
void check_agreement(const at::Tensor& rows, const std::vector<std::string>& fields, const std::string& expected,
                     const std::function<std::string(size_t field, const at::Tensor& row)>& show) {
  std::ostringstream differ;
  for (size_t f = 0; f < fields.size(); ++f) {
    if (fields[f].empty()) {
      continue;
    }
    auto end = f + 1;
    while (end < fields.size() && fields[end].empty()) {
      ++end;
    }
    const auto columns = rows.narrow(1, static_cast<int64_t>(f), static_cast<int64_t>(end - f));
    if (!(columns == columns[0]).all().item<bool>()) {
      differ << (differ.tellp() > 0 ? "; " : "") << fields[f] << ":";
      for (int64_t r = 0; r < rows.size(0); ++r) {
        differ << (r ? "," : "") << " rank " << r << " " << show(f, rows[r]);
      }
    }
  }
  TORCH_CHECK_VALUE(differ.tellp() == 0, kOp, ": the ranks disagree (", differ.str(), "); expected ", expected);
}

// Every rank's `row` compared with one all-gather before anything moves: c10::ValueError naming the
// fields (their columns in `row`) that differ. A rank that refused (`refused`: its own
// c10::ValueError) still takes part, so that no rank waits for it: it raises its own error, the
// others one naming it.
void agree(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const Group& info, c10::Device device,
           std::exception_ptr refused, std::vector<int64_t> row, const std::vector<std::string>& fields,
           const std::string& expected, const std::function<std::string(size_t field, const at::Tensor& row)>& show) {
  row.push_back(refused ? 1 : 0);
  const auto rows = gather_rows(group, info, device, row);
  if (refused) {
    std::rethrow_exception(refused);
  }
  std::vector<int64_t> refusing;
  for (int64_t r = 0; r < rows.size(0); ++r) {
    if (rows[r][rows.size(1) - 1].item<int64_t>()) {
      refusing.push_back(r);
    }
  }
  TORCH_CHECK_VALUE(refusing.empty(), kOp, ": rank(s) ", join(refusing),
                    " refused their arguments (their errors name why); expected ", expected);
  check_agreement(rows, fields, expected, show);
}

// agree() over the pipeline's group, then over the tensor-parallel one (when `tp` is set) with
// `expected` naming it: a rank that failed the first takes part in the second as refusing, so that
// no rank waits for it.
void agree_in_mesh(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const Group& info,
                   const std::optional<Group>& tp, c10::Device device, std::exception_ptr refused,
                   const std::vector<int64_t>& row, const std::vector<std::string>& fields,
                   const std::string& expected,
                   const std::function<std::string(size_t field, const at::Tensor& row)>& show) {
  try {
    agree(group, info, device, refused, row, fields, expected, show);
  } catch (const c10::ValueError&) {
    if (!tp) {
      throw;
    }
    refused = std::current_exception();
  }
  if (tp) {
    agree(detail::resolve_group(kOp, tp->name, tp->size), *tp, device, refused, row, fields,
          expected + " (compared over the tensor-parallel group '" + tp->name + "')", show);
  }
}

constexpr int64_t kShownDims = 8;

// dim, then up to kShownDims sizes (-1 past the tensor's dims), then a hash of every size; all -1
// for an undefined tensor.
void append_shape(std::vector<int64_t>& row, const at::Tensor& tensor) {
  if (!tensor.defined()) {
    row.insert(row.end(), kShownDims + 2, -1);
    return;
  }
  row.push_back(tensor.dim());
  int64_t hash = 0;
  for (int64_t d = 0; d < kShownDims; ++d) {
    row.push_back(d < tensor.dim() ? tensor.size(d) : -1);
  }
  for (const auto size : tensor.sizes()) {
    hash = hash * 1000003 + size;
  }
  row.push_back(hash);
}

std::string show_shape(const at::Tensor& row, int64_t at) {
  const auto dim = row[at].item<int64_t>();
  std::vector<int64_t> sizes;
  for (int64_t d = 0; d < std::min(dim, kShownDims); ++d) {
    sizes.push_back(row[at + 1 + d].item<int64_t>());
  }
  return join(sizes) + (dim > kShownDims ? "..." : "");
}

std::vector<at::Tensor> micro_batches(const at::Tensor& tensor, int64_t chunks, const char* what) {
  TORCH_CHECK_VALUE(tensor.defined() && tensor.dim() >= 1, kOp, ": ", what,
                    " is undefined or a scalar; expected a batch along dim 0");
  TORCH_CHECK_VALUE(chunks <= tensor.size(0), kOp, ": chunks = ", chunks, " but the ", what, " batch holds ",
                    tensor.size(0), " samples; expected chunks <= the batch size");
  return tensor.tensor_split(chunks, 0);
}

const char* const kEventKinds[] = {"F", "B", "W", "recv-wait"};

} // namespace

PipelineParallelImpl::PipelineParallelImpl(torch::nn::Sequential sequential, Group group, PipelineOptions options)
    : group_(std::move(group)), options_(std::move(options)), kind_(pipeline::ScheduleKind::GPipe) {
  TORCH_CHECK_VALUE(group_.size >= 1 && group_.rank >= 0 && group_.rank < group_.size, kOp, ": group '", group_.name,
                    "' has size ", group_.size, " and rank ", group_.rank, "; expected 0 <= rank < size");
  // This rank's own checks; a rank that refuses still takes part in the comparison below.
  std::exception_ptr refused;
  std::vector<int64_t> balance = options_.balance();
  try {
    TORCH_CHECK_VALUE(!sequential.is_empty(), kOp, ": sequential is null; expected a torch::nn::Sequential");
    kind_ = pipeline::parse_schedule_kind(options_.schedule());
    TORCH_CHECK_VALUE(options_.chunks() >= 1, kOp, ": chunks is ", options_.chunks(), "; expected at least 1");
    TORCH_CHECK_VALUE(options_.stages_per_rank() >= 0, kOp, ": stages_per_rank is ", options_.stages_per_rank(),
                      "; expected at least 1 (or 0 for the schedule's default)");
    if (options_.stages_per_rank() == 0) {
      const bool two = kind_ == pipeline::ScheduleKind::Interleaved1F1B || kind_ == pipeline::ScheduleKind::ZeroBubbleV;
      options_.stages_per_rank(two ? 2 : 1);
    }
    if (options_.timeout()) {
      TORCH_CHECK_VALUE(options_.timeout()->count() > 0, kOp, ": timeout is ", options_.timeout()->count(),
                        " ms; expected a positive duration");
    }
    stage_ranks_ = pipeline::stage_ranks(kind_, group_.size, options_.stages_per_rank());
    const auto num_stages = static_cast<int64_t>(stage_ranks_.size());
    num_layers_ = static_cast<int64_t>(sequential->size());
    if (balance.empty()) {
      TORCH_CHECK_VALUE(num_layers_ >= num_stages, kOp, ": the Sequential has ", num_layers_,
                        " layers but the pipeline has ", num_stages, " stages (group size ", group_.size,
                        " x stages_per_rank ", options_.stages_per_rank(), "); expected at least one layer per stage");
      for (int64_t s = 0; s < num_stages; ++s) {
        balance.push_back(num_layers_ / num_stages + (s < num_layers_ % num_stages ? 1 : 0));
      }
    } else {
      TORCH_CHECK_VALUE(static_cast<int64_t>(balance.size()) == num_stages, kOp, ": balance ", join(balance), " has ",
                        balance.size(), " entries but the group has ", group_.size, " ranks x stages_per_rank ",
                        options_.stages_per_rank(), " = ", num_stages, " stages; expected one layer count per stage");
      for (const auto count : balance) {
        TORCH_CHECK_VALUE(count >= 1, kOp, ": balance ", join(balance), " has a stage of ", count,
                          " layers; expected at least one layer per stage");
      }
      const auto total = std::accumulate(balance.begin(), balance.end(), int64_t{0});
      TORCH_CHECK_VALUE(total == num_layers_, kOp, ": balance ", join(balance), " adds up to ", total,
                        " layers but the Sequential has ", num_layers_, "; expected the counts to add up to ",
                        num_layers_);
    }
  } catch (const c10::ValueError&) {
    refused = std::current_exception();
  }
  c10::intrusive_ptr<c10d::ProcessGroup> process_group;
  if (group_.size > 1) {
    try {
      process_group = detail::resolve_group(kOp, group_.name, group_.size);
      TORCH_CHECK_VALUE(process_group->getRank() == group_.rank, kOp, ": group '", group_.name, "' says rank ",
                        group_.rank, " but this process is rank ", process_group->getRank(), " of it");
    } catch (...) {
      if (refused) {
        std::rethrow_exception(refused);
      }
      throw;
    }
  }
  // The tensor-parallel group of the Sequential's layers (pp x tp): its ranks run the same stages.
  try {
    if (!sequential.is_empty()) {
      tensor_parallel_group_ = detail::tensor_parallel_group(*sequential, kOp);
    }
  } catch (const c10::ValueError&) {
    refused = refused ? refused : std::current_exception();
  }
  // Every rank must run the same plan: compared before any activation moves, over the pipeline's
  // group and then over the tensor-parallel one.
  int64_t balance_hash = 0;
  for (const auto count : balance) {
    balance_hash = balance_hash * 1000003 + count;
  }
  const std::vector<int64_t> row = {static_cast<int64_t>(kind_), options_.stages_per_rank(), options_.chunks(),
                                    num_layers_, balance_hash};
  const auto show = [&](size_t field, const at::Tensor& r) {
    const auto value = r[static_cast<int64_t>(field)].item<int64_t>();
    if (field == 0) {
      return "'" + pipeline::schedule_kind_name(static_cast<pipeline::ScheduleKind>(value)) + "'";
    }
    return field == 4 ? std::string("(a different balance)") : std::to_string(value);
  };
  const std::vector<std::string> fields = {"schedule", "stages_per_rank", "chunks", "Sequential layers", "balance"};
  agree_in_mesh(process_group, group_, tensor_parallel_group_, options_.device(), refused, row, fields,
                "every rank to call pipeline_parallel with the same options and the same Sequential", show);
  const auto num_stages = static_cast<int64_t>(stage_ranks_.size());
  int64_t first = 0;
  layers_.resize(static_cast<size_t>(num_layers_));
  for (int64_t s = 0; s < num_stages; ++s) {
    stage_layers_.emplace_back(first, first + balance[static_cast<size_t>(s)]);
    first += balance[static_cast<size_t>(s)];
  }
  for (const auto s : local_stages()) {
    for (auto i = stage_layers_[s].first; i < stage_layers_[s].second; ++i) {
      // The module itself, not a copy: registered under the Sequential's name for it.
      auto module = sequential->ptr(static_cast<size_t>(i));
      module->to(options_.device());
      register_module(std::to_string(i), module);
      layers_[static_cast<size_t>(i)] = sequential->begin()[i];
    }
  }
}

std::vector<int64_t> PipelineParallelImpl::local_stages() const {
  std::vector<int64_t> stages;
  for (int64_t s = 0; s < static_cast<int64_t>(stage_ranks_.size()); ++s) {
    if (stage_ranks_[s] == group_.rank) {
      stages.push_back(s);
    }
  }
  return stages;
}

at::Tensor PipelineParallelImpl::forward(const at::Tensor& input) {
  return run(input, nullptr, nullptr, nullptr, std::nullopt);
}

at::Tensor PipelineParallelImpl::train_step(
    const at::Tensor& input,
    const at::Tensor& target,
    const LossFunction& loss_fn,
    std::vector<pipeline::TimelineEvent>* timeline,
    std::optional<double> max_norm) {
  TORCH_CHECK_VALUE(loss_fn != nullptr, kOp, ": train_step got an empty loss_fn; expected a loss function");
  return run(input, &target, &loss_fn, timeline, max_norm);
}

at::Tensor PipelineParallelImpl::run(const at::Tensor& input, const at::Tensor* target, const LossFunction* loss_fn,
                                     std::vector<pipeline::TimelineEvent>* timeline, std::optional<double> max_norm) {
  TORCH_CHECK(!broken_, kOp, ": an earlier step failed on ", "rank ", group_.rank,
              "; the ranks' messages are out of step: build the pipeline again (and its group)");
  const bool train = target != nullptr;
  const auto chunks = options_.chunks();
  c10::intrusive_ptr<c10d::ProcessGroup> process_group;
  if (group_.size > 1) {
    process_group = detail::resolve_group(kOp, group_.name, group_.size);
  }
  // This rank's own checks, then the ranks compare what they are about to run (a rank that refused
  // takes part too) before the first activation moves.
  std::exception_ptr refused;
  std::vector<at::Tensor> inputs, targets;
  // Post-accumulate hooks run once after the step; a gradient hook is refused (see HeldPostAccumulateHooks).
  std::optional<detail::HeldPostAccumulateHooks> held;
  try {
    inputs = micro_batches(input, chunks, "input");
    if (train) {
      targets = micro_batches(*target, chunks, "target");
      TORCH_CHECK_VALUE(input.size(0) == target->size(0), kOp, ": train_step got ", input.size(0), " inputs but ",
                        target->size(0), " targets; expected one target per sample along dim 0");
      held.emplace(named_parameters(), chunks, kOp);
      TORCH_CHECK_VALUE(!max_norm || *max_norm >= 0, kOp, ": train_step got max_norm = ", *max_norm,
                        "; expected a number >= 0 (or none)");
    }
  } catch (const c10::ValueError&) {
    refused = std::current_exception();
  }
  {
    // max_norm's bits (-1: none), so that ranks clipping differently are told apart.
    int64_t max_norm_bits = -1;
    if (max_norm) {
      std::memcpy(&max_norm_bits, &*max_norm, sizeof(max_norm_bits));
    }
    std::vector<int64_t> row = {train ? 1 : 0, timeline != nullptr ? 1 : 0};
    append_shape(row, input);
    append_shape(row, train ? *target : at::Tensor());
    const auto target_at = 2 + kShownDims + 2;
    const auto max_norm_at = static_cast<int64_t>(row.size());
    row.push_back(max_norm_bits);
    std::vector<std::string> fields = {"call", "timeline"};
    fields.resize(row.size());
    fields[2] = "input shape";
    fields[target_at] = "target shape";
    fields[max_norm_at] = "max_norm";
    agree_in_mesh(process_group, group_, tensor_parallel_group_, options_.device(), refused, row, fields,
          "every rank to call the same method (train_step or forward) with the same batch shapes and max_norm",
          [&](size_t field, const at::Tensor& r) -> std::string {
            if (field == 0) {
              return r[0].item<int64_t>() ? "train_step" : "forward";
            }
            if (field == 1) {
              return r[1].item<int64_t>() ? "with a timeline" : "without a timeline";
            }
            if (field == static_cast<size_t>(max_norm_at)) {
              const auto bits = r[max_norm_at].item<int64_t>();
              double value = 0;
              std::memcpy(&value, &bits, sizeof(value));
              return bits == -1 ? std::string("none") : c10::str(value);
            }
            return show_shape(r, field < static_cast<size_t>(target_at) ? 2 : target_at);
          });
  }
  const auto num_stages = static_cast<int64_t>(stage_ranks_.size());
  const auto last_stage = num_stages - 1;
  const auto device = options_.device();
  const auto timeout = options_.timeout().value_or(
      process_group ? detail::timeout_of(*process_group, c10::kCPU).value_or(std::chrono::minutes(10))
                    : std::chrono::milliseconds(std::chrono::minutes(10)));
  Transport transport(process_group, group_, device, timeout);

  std::vector<pipeline::Action> actions;
  if (train) {
    actions = pipeline::make_schedule(kind_, group_.size, options_.stages_per_rank(), chunks)[group_.rank];
  } else {
    for (const auto s : local_stages()) {
      for (int64_t m = 0; m < chunks; ++m) {
        actions.push_back({pipeline::ActionKind::Forward, s, m});
      }
    }
  }
  const bool zero_bubble =
      train && (kind_ == pipeline::ScheduleKind::ZeroBubbleH1 || kind_ == pipeline::ScheduleKind::ZeroBubbleV);
  const auto first_slot = zero_bubble ? pipeline::allocate_weight_gradient_slots(num_stages * chunks) : -1;
  auto slot_of = [&](int64_t stage, int64_t m) { return zero_bubble ? first_slot + stage * chunks + m : int64_t{-1}; };
  auto weight_of = [&](int64_t m) {
    return static_cast<double>(inputs[m].size(0)) / static_cast<double>(input.size(0));
  };

  if (timeline && process_group) { // every rank's times count from this barrier's exit
    auto flag = at::zeros({1}, at::TensorOptions().dtype(at::kLong).device(device));
    detail::start_all_reduce(std::string("torch_mp::") + kOp, process_group, flag).wait();
  }
  detail::Recorder recorder(timeline);
  std::vector<at::Tensor> losses(chunks), outputs(chunks);
  // Per (stage, micro-batch): the stage's input (a leaf) and output (the weighted loss on the last stage).
  std::map<std::pair<int64_t, int64_t>, std::pair<at::Tensor, at::Tensor>> saved;
  auto receive = [&](const Key& key, int64_t stage) {
    const auto src = stage_ranks_[std::get<2>(key)];
    return transport.recv(src, key, [&](auto body) { recorder.record(stage, "recv-wait", std::get<1>(key), body); });
  };
  auto run_forward = [&](int64_t s, int64_t m) {
    const auto [first, last] = stage_layers_[s];
    at::Tensor x = s == 0 ? inputs[m].to(device) : receive({kActivation, m, s - 1, s}, s);
    at::Tensor y = detail::run_layers(layers_, first, last, x, slot_of(s, m));
    if (s == last_stage) {
      if (!train) {
        outputs[m] = y;
        return;
      }
      auto loss = (*loss_fn)(y, targets[m].to(device));
      TORCH_CHECK_VALUE(loss.defined() && loss.dim() == 0, kOp, ": loss_fn returned a tensor of shape ",
                        loss.defined() ? loss.sizes() : c10::IntArrayRef(),
                        loss.defined() ? "" : " (undefined)", "; expected a scalar, the micro-batch's mean loss");
      losses[m] = loss.detach();
      y = loss * weight_of(m);
    } else {
      transport.send(stage_ranks_[s + 1], {kActivation, m, s, s + 1}, y);
    }
    if (train) {
      saved[{s, m}] = {x, y};
    }
  };
  auto run_backward = [&](int64_t s, int64_t m) {
    auto [x, y] = std::move(saved.at({s, m}));
    saved.erase({s, m});
    if (s == last_stage) {
      if (y.requires_grad()) {
        torch::autograd::backward({y});
      }
    } else if (y.requires_grad()) {
      auto grad = receive({kGradient, m, s + 1, s}, s);
      torch::autograd::backward({y}, {grad});
    }
    if (s > 0 && x.requires_grad()) {
      transport.send(stage_ranks_[s - 1], {kGradient, m, s, s - 1},
                     x.grad().defined() ? x.grad() : at::zeros_like(x));
    }
  };
  try {
    torch::AutoGradMode grad_mode(train);
    for (const auto& action : actions) {
      const auto s = action.stage, m = action.microbatch;
      switch (action.kind) {
        case pipeline::ActionKind::Forward:
          recorder.record(s, "F", m, [&] { run_forward(s, m); });
          break;
        case pipeline::ActionKind::Backward:
          recorder.record(s, "B", m, [&] { run_backward(s, m); });
          break;
        case pipeline::ActionKind::Weight:
          recorder.record(s, "W", m, [&] { pipeline::run_weight_gradients(slot_of(s, m)); });
          break;
      }
    }
    transport.finish();
  } catch (...) {
    broken_ = true;
    for (int64_t slot = first_slot; zero_bubble && slot < first_slot + num_stages * chunks; ++slot) {
      pipeline::discard_weight_gradients(slot);
    }
    try {
      throw;
    } catch (const PeerStopped& stopped) {
      transport.abort(stopped.message, stopped.value_error, stopped.rank);
      const auto message = std::string(kOp) + ": rank " + std::to_string(stopped.rank) + " stopped the step: " +
                           stopped.message;
      if (stopped.value_error) {
        TORCH_CHECK_VALUE(false, message);
      }
      TORCH_CHECK(false, message);
    } catch (const c10::ValueError& error) {
      transport.abort(error.what_without_backtrace(), true, -1);
      throw;
    } catch (const c10::Error& error) {
      transport.abort(error.what_without_backtrace(), false, -1);
      throw;
    } catch (const std::exception& error) {
      transport.abort(error.what(), false, -1);
      throw;
    }
  }
  recorder.sort();
  if (held) {
    held->run();
  }
  if (timeline && process_group) { // every rank's events, to every rank
    auto mine = at::empty({static_cast<int64_t>(timeline->size()), 5}, at::kDouble);
    for (size_t i = 0; i < timeline->size(); ++i) {
      const auto& event = (*timeline)[i];
      const auto kind = std::find_if(std::begin(kEventKinds), std::end(kEventKinds),
                                     [&](const char* k) { return event.kind == k; }) - std::begin(kEventKinds);
      const double values[] = {static_cast<double>(event.stage), static_cast<double>(kind),
                               static_cast<double>(event.micro_batch), event.start, event.end};
      std::memcpy(mine[static_cast<int64_t>(i)].data_ptr(), values, sizeof(values));
    }
    const auto counts = gather_rows(process_group, group_, device, {mine.size(0)});
    const auto most = counts.max().item<int64_t>();
    auto padded = at::zeros({most, 5}, at::kDouble);
    padded.narrow(0, 0, mine.size(0)).copy_(mine);
    padded = padded.to(device);
    auto all = at::empty({group_.size, most, 5}, padded.options());
    detail::all_gather_into(std::string("torch_mp::") + kOp, process_group, all, padded);
    all = all.to(at::kCPU);
    timeline->clear();
    for (int64_t r = 0; r < group_.size; ++r) {
      for (int64_t i = 0; i < counts[r][0].item<int64_t>(); ++i) {
        const auto row = all[r][i];
        const auto* v = row.data_ptr<double>();
        timeline->push_back({static_cast<int64_t>(v[0]), kEventKinds[static_cast<int64_t>(v[1])],
                             static_cast<int64_t>(v[2]), v[3], v[4]});
      }
    }
    std::sort(timeline->begin(), timeline->end(), [](const auto& a, const auto& b) {
      return std::tie(a.stage, a.start) < std::tie(b.stage, b.start);
    });
  }
  const bool holds_last = stage_ranks_[last_stage] == group_.rank;
  if (!train) {
    return transport.broadcast(holds_last ? at::cat(outputs, 0) : at::Tensor(), stage_ranks_[last_stage]);
  }
  // The batch's loss on every rank, from the rank holding the last stage.
  auto total = at::zeros({1}, at::TensorOptions().dtype(at::kDouble).device(device));
  if (holds_last) {
    for (int64_t m = 0; m < chunks; ++m) {
      total += losses[m].to(device, at::kDouble) * weight_of(m);
    }
  }
  if (process_group) {
    detail::start_all_reduce(std::string("torch_mp::") + kOp, process_group, total).wait();
  }
  if (max_norm) {
    clip_grad_norm_(*this, *max_norm);
  }
  return total.to(at::kCPU)[0];
}


void save(const PipelineParallel& model, const std::string& path) {
  const auto& group = model->group();
  c10::intrusive_ptr<c10d::ProcessGroup> process_group;
  if (group.size > 1) {
    process_group = detail::resolve_group("torch_mp::save", group.name, group.size);
  }
  // The index names every layer's tensors: this rank's with their names, the others' gathered.
  const auto mine = detail::named_tensors(*model);
  std::vector<std::string> names;
  for (const auto& [name, tensor] : mine) {
    names.push_back(name);
  }
  std::vector<std::string> model_names = names;
  if (process_group) {
    std::string joined;
    for (const auto& name : names) {
      joined += name + '\n';
    }
    const auto lengths = gather_rows(process_group, group, model->options().device(),
                                     {static_cast<int64_t>(joined.size())});
    const auto longest = lengths.max().item<int64_t>();
    auto bytes = at::zeros({longest}, at::kByte);
    std::memcpy(bytes.data_ptr(), joined.data(), joined.size());
    bytes = bytes.to(model->options().device());
    auto all = at::empty({group.size, longest}, bytes.options());
    detail::all_gather_into("torch_mp::save", process_group, all, bytes);
    all = all.to(at::kCPU);
    model_names.clear();
    std::vector<std::pair<int64_t, std::string>> ordered; // by layer, as the dense model lists them
    for (int64_t r = 0; r < group.size; ++r) {
      const std::string text(reinterpret_cast<const char*>(all[r].data_ptr<uint8_t>()),
                             static_cast<size_t>(lengths[r][0].item<int64_t>()));
      std::istringstream lines(text);
      for (std::string line; std::getline(lines, line);) {
        ordered.emplace_back(std::stoll(line.substr(0, line.find('.'))), line);
      }
    }
    std::stable_sort(ordered.begin(), ordered.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (const auto& [layer, name] : ordered) {
      model_names.push_back(name);
    }
  }
  const auto device = model->options().device();
  detail::save_checkpoint(mine, model_names, path, group.rank, group.size,
                          [&](const std::string& step, std::exception_ptr error) {
                            auto failed = gather_rows(process_group, group, device, {error ? 1 : 0});
                            if (error) {
                              std::rethrow_exception(error);
                            }
                            std::vector<int64_t> ranks;
                            for (int64_t r = 0; r < group.size; ++r) {
                              if (failed[r][0].item<int64_t>()) {
                                ranks.push_back(r);
                              }
                            }
                            TORCH_CHECK(ranks.empty(), "torch_mp::save: rank(s) ", join(ranks), " failed ", step,
                                        "; see their errors");
                          });
}

void load(PipelineParallel& model, const std::string& path) {
  detail::load_checkpoint(detail::named_tensors(*model), path, true, model->group().rank, model->group().size);
}

PipelineParallel pipeline_parallel(torch::nn::Sequential sequential, const Group& group, PipelineOptions options) {
  return PipelineParallel(std::move(sequential), group, std::move(options));
}

} // namespace torch_mp
