// Async tensor parallelism for sequence parallel layers: the all-gather before a column-parallel matmul
// and the reduce-scatter after a row-parallel one, decomposed into chunks so that the collective of
// one chunk runs while another chunk's matmul computes (Wang et al., "Overlap Communication with
// Dependent Computation via Decomposition", ASPLOS 2023; PyTorch's fused_all_gather_matmul and
// fused_matmul_reduce_scatter, torchtitan's async TP). Built on c10d's asynchronous work handles.
// Autograd: autograd/async_tp.cpp; Meta kernels: meta/async_tp.cpp.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

#include <torch_mp/ops.h>

#include "comm/collectives.h"
#include "comm/group.h"
#include "ops/checks.h"

namespace torch_mp {

std::tuple<at::Tensor, std::vector<at::Tensor>> all_gather_matmul(
    const at::Tensor& input,
    at::TensorList weights,
    int64_t dim,
    const Group& group,
    int64_t chunks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mp::all_gather_matmul", "")
                       .typed<std::tuple<at::Tensor, std::vector<at::Tensor>>(
                           const at::Tensor&, at::TensorList, int64_t, int64_t, c10::string_view, int64_t)>();
  return op.call(input, weights, dim, chunks, group.name, group.size);
}

at::Tensor matmul_reduce_scatter(
    const at::Tensor& input,
    const at::Tensor& weight,
    int64_t dim,
    const Group& group,
    int64_t chunks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mp::matmul_reduce_scatter", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, int64_t, int64_t, c10::string_view, int64_t)>();
  return op.call(input, weight, dim, chunks, group.name, group.size);
}

namespace primitives {

at::Tensor matmul_reduce_scatter(
    at::TensorList inputs,
    at::TensorList weights,
    const std::optional<at::Tensor>& addend,
    int64_t dim,
    const Group& group,
    int64_t chunks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mp::_matmul_reduce_scatter", "")
                       .typed<at::Tensor(
                           at::TensorList, at::TensorList, const std::optional<at::Tensor>&, int64_t, int64_t,
                           c10::string_view, int64_t)>();
  return op.call(inputs, weights, addend, dim, chunks, group.name, group.size);
}

} // namespace primitives

namespace {

using detail::kAllGatherMatmul;
using detail::kMatmulReduceScatter;

// [group size * rows, *rest] laid back along `dim`: the rank blocks in rank order, as gather_from_sp
// lays them. A copy only when dim is not 0.
at::Tensor rank_blocks_along(const at::Tensor& stacked, int64_t dim) {
  return stacked.flatten(0, 1).movedim(0, dim).contiguous();
}

// gathered = all_gather(input, dim); outputs[i] = gathered @ weights[i].T. This rank's rows need no
// collective: their matmuls run while the first chunk travels; then chunk c + 1 travels while the
// other ranks' rows of chunk c are multiplied.
std::tuple<at::Tensor, std::vector<at::Tensor>> all_gather_matmul_kernel(
    const at::Tensor& input,
    at::TensorList weights,
    int64_t dim,
    int64_t chunks,
    c10::string_view group_name,
    int64_t group_size) {
  const auto wrapped = detail::check_all_gather_matmul(kAllGatherMatmul, input, weights, dim, chunks, group_size);
  std::vector<at::Tensor> outputs;
  if (group_size == 1) {
    auto gathered = input.clone(at::MemoryFormat::Contiguous);
    for (const auto& weight : weights) {
      outputs.push_back(at::matmul(gathered, weight.t()));
    }
    return {gathered, outputs};
  }
  const auto group = detail::resolve_group(kAllGatherMatmul, group_name, group_size);
  const auto rank = group->getRank();
  // Rows first: each chunk is then a contiguous block of rows.
  const auto rows = input.movedim(wrapped, 0).contiguous();
  const auto piece = rows.size(0) / chunks;
  auto gathered_shape = rows.sizes().vec();
  gathered_shape.insert(gathered_shape.begin(), group_size);  // [group size, rows, *rest]
  auto gathered = at::empty(gathered_shape, rows.options());
  std::vector<at::Tensor> stacked;  // outputs[i] as [group size, rows, *rest, out features i]
  for (const auto& weight : weights) {
    auto shape = gathered_shape;
    shape.back() = weight.size(0);
    stacked.push_back(at::empty(shape, rows.options()));
  }
  // Each chunk gathers into a buffer of its own ([group size, piece, *rest]), copied into place after;
  // a single chunk gathers in place.
  std::vector<at::Tensor> buffers(chunks);
  const auto start = [&](int64_t c) {
    auto shape = gathered_shape;
    shape[1] = piece;
    buffers[c] = chunks == 1 ? gathered : at::empty(shape, rows.options());
    return detail::start_all_gather(kAllGatherMatmul, group, buffers[c], rows.narrow(0, c * piece, piece));
  };
  auto in_flight = start(0);
  for (size_t i = 0; i < weights.size(); ++i) {
    auto own = stacked[i].select(0, rank);
    at::matmul_out(own, rows, weights[i].t());
  }
  for (int64_t c = 0; c < chunks; ++c) {
    std::optional<detail::Pending> next;
    if (c + 1 < chunks) {
      next.emplace(start(c + 1));
    }
    in_flight.wait();
    if (chunks > 1) {
      gathered.narrow(1, c * piece, piece).copy_(buffers[c]);
    }
    for (int64_t r = 0; r < group_size; ++r) {
      if (r == rank) {
        continue;
      }
      for (size_t i = 0; i < weights.size(); ++i) {
        auto out = stacked[i].select(0, r).narrow(0, c * piece, piece);
        at::matmul_out(out, buffers[c].select(0, r), weights[i].t());
      }
    }
    buffers[c].reset();
    if (next) {
      in_flight = std::move(*next);
    }
  }
  for (auto& output : stacked) {
    outputs.push_back(rank_blocks_along(output, wrapped));
  }
  return {rank_blocks_along(gathered, wrapped), outputs};
}

// reduce_scatter(addend + sum_i inputs[i] @ weights[i].T, dim). The rows each rank keeps are computed
// chunk by chunk, rank by rank, and each is summed onto its rank (a reduce) while the next computes.
at::Tensor matmul_reduce_scatter_primitive_kernel(
    at::TensorList inputs,
    at::TensorList weights,
    const std::optional<at::Tensor>& addend,
    int64_t dim,
    int64_t chunks,
    c10::string_view group_name,
    int64_t group_size) {
  const auto wrapped =
      detail::check_matmul_reduce_scatter(kMatmulReduceScatter, inputs, weights, addend, dim, chunks, group_size);
  const bool has_addend = addend.has_value() && addend->defined();
  // The partial sum over the rows [start, start + length) along dim, as a fresh contiguous tensor.
  const auto partial = [&](int64_t start, int64_t length) {
    at::Tensor sum;
    for (size_t i = 0; i < inputs.size(); ++i) {
      auto product = at::matmul(inputs[i].narrow(wrapped, start, length).movedim(wrapped, 0), weights[i].t());
      sum = sum.defined() ? sum.add_(product) : product;
    }
    const auto extra = has_addend ? addend->narrow(wrapped, start, length).movedim(wrapped, 0) : at::Tensor();
    if (!sum.defined()) {
      return extra.clone(at::MemoryFormat::Contiguous);
    }
    return (extra.defined() ? sum.add_(extra) : sum).contiguous();
  };
  const auto& reference = inputs.empty() ? *addend : inputs[0];
  if (group_size == 1) {
    return partial(0, reference.size(wrapped)).movedim(0, wrapped).contiguous();
  }
  const auto group = detail::resolve_group(kMatmulReduceScatter, group_name, group_size);
  const auto rank = group->getRank();
  const auto block = reference.size(wrapped) / group_size;
  const auto piece = block / chunks;
  std::vector<at::Tensor> own(chunks);
  std::vector<at::Tensor> sent;  // kept alive until their reduce completes
  std::vector<detail::Pending> in_flight;
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t r = 0; r < group_size; ++r) {
      auto sum = partial(r * block + c * piece, piece);
      in_flight.push_back(detail::start_reduce(kMatmulReduceScatter, group, sum, r));
      sent.push_back(sum);
      if (r == rank) {
        own[c] = sum;
      }
    }
  }
  for (auto& pending : in_flight) {
    pending.wait();
  }
  return at::cat(own, 0).movedim(0, wrapped).contiguous();
}

at::Tensor matmul_reduce_scatter_kernel(
    const at::Tensor& input,
    const at::Tensor& weight,
    int64_t dim,
    int64_t chunks,
    c10::string_view group_name,
    int64_t group_size) {
  return primitives::matmul_reduce_scatter(
      {input}, {weight}, std::nullopt, dim, Group{std::string(group_name), group_size, 0}, chunks);
}

} // namespace

TORCH_LIBRARY_FRAGMENT(torch_mp, m) {
  const std::vector<at::Tag> pt2_compliant{at::Tag::pt2_compliant_tag};
  m.def(
      "all_gather_matmul(Tensor input, Tensor[] weights, int dim, int chunks, str group_name, int group_size) "
      "-> (Tensor, Tensor[])",
      pt2_compliant);
  m.def(
      "matmul_reduce_scatter(Tensor input, Tensor weight, int dim, int chunks, str group_name, int group_size) "
      "-> Tensor",
      pt2_compliant);
  m.def(
      "_matmul_reduce_scatter(Tensor[] inputs, Tensor[] weights, Tensor? addend, int dim, int chunks, "
      "str group_name, int group_size) -> Tensor",
      pt2_compliant);
}

TORCH_LIBRARY_IMPL(torch_mp, CompositeExplicitAutograd, m) {
  m.impl("all_gather_matmul", &all_gather_matmul_kernel);
  m.impl("matmul_reduce_scatter", &matmul_reduce_scatter_kernel);
  m.impl("_matmul_reduce_scatter", &matmul_reduce_scatter_primitive_kernel);
}

} // namespace torch_mp
