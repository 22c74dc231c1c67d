"""Async TP: the all-gather + matmul and matmul + reduce-scatter ops, decomposed into chunks that
overlap the collective with the matmuls, against the undecomposed collectives and the dense model
on 2 Gloo ranks; tensor_parallel(sequence_parallel=True, async_tp=...) on Llama and GPT-2, eager
and compiled."""
import copy

import pytest
import torch
from torch.distributed.tensor import DTensor
import torch.distributed as dist
from torch.library import opcheck
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks
from tensors import close, leaf

transformers = pytest.importorskip("transformers")

# A decomposed matmul multiplies fewer rows at once than the undecomposed one; BLAS may block it
# otherwise and round a sum of products differently (seen: 1 ulp). The gradients of the models
# below are sums over ranks and over q, k and v, added in another order than the dense model adds
# them, as in the other tensor-parallel tests.
MODEL_RTOL, MODEL_ATOL = 1e-4, 1e-5


# --- the ops ------------------------------------------------------------------------------------

def check_ops(rank, world):
    group = dist.group.WORLD.group_name
    for dim, chunks in ((1, 1), (1, 2), (0, 3), (-2, 1)):
        full = torch.randn(3, 6 * world, 16) if dim != 0 else torch.randn(6 * world, 3, 16)
        shard = full.chunk(world, dim)[rank]
        weights = [torch.randn(6, 16), torch.randn(4, 16)]
        # all_gather_matmul against gather_from_sp + F.linear: values and every gradient.
        x, ws = leaf(shard), [leaf(w) for w in weights]
        gathered, outputs = torch.ops.torch_mp.all_gather_matmul(x, ws, dim, chunks, group, world)
        x_ref, ws_ref = leaf(shard), [leaf(w) for w in weights]
        gathered_ref = torch.ops.torch_mp.gather_from_sp(x_ref, dim, group, world)
        outputs_ref = [F.linear(gathered_ref, w) for w in ws_ref]
        close(gathered, gathered_ref, f"gathered dim={dim} chunks={chunks}")
        assert torch.equal(gathered, full)
        for i, (out, ref) in enumerate(zip(outputs, outputs_ref)):
            close(out, ref, f"output {i} dim={dim} chunks={chunks}")
        # The gathered tensor's own gradient joins the products' in the one reduce-scatter.
        seeds = [torch.randn_like(t) for t in [gathered] + outputs]
        torch.autograd.backward([gathered] + outputs, seeds)
        torch.autograd.backward([gathered_ref] + outputs_ref, seeds)
        close(x.grad, x_ref.grad, f"input grad dim={dim} chunks={chunks}")
        for i, (w, w_ref) in enumerate(zip(ws, ws_ref)):
            close(w.grad, w_ref.grad, f"weight {i} grad dim={dim} chunks={chunks}")

        # matmul_reduce_scatter against F.linear + reduce_scatter_to_sp, each rank its own input.
        partial_input = torch.randn(full.shape[:-1] + (5,)) * (rank + 1)
        weight = torch.randn(7, 5)
        y_in, y_w = leaf(partial_input), leaf(weight)
        y = torch.ops.torch_mp.matmul_reduce_scatter(y_in, y_w, dim, chunks, group, world)
        r_in, r_w = leaf(partial_input), leaf(weight)
        y_ref = torch.ops.torch_mp.reduce_scatter_to_sp(F.linear(r_in, r_w), dim, group, world)
        close(y, y_ref, f"matmul_reduce_scatter dim={dim} chunks={chunks}")
        seed = torch.randn_like(y)
        y.backward(seed)
        y_ref.backward(seed)
        close(y_in.grad, r_in.grad, f"matmul_reduce_scatter input grad dim={dim}")
        close(y_w.grad, r_w.grad, f"matmul_reduce_scatter weight grad dim={dim}")

    # opcheck on 2 ranks: schemas, fake kernels, autograd registration, dynamo.
    shard = torch.randn(2, 4, 8)
    opcheck(torch.ops.torch_mp.all_gather_matmul.default, (leaf(shard), [leaf(torch.randn(3, 8))], 1, 2, group, world))
    opcheck(torch.ops.torch_mp.matmul_reduce_scatter.default,
            (leaf(torch.randn(2, 4 * world, 8)), leaf(torch.randn(3, 8)), 1, 2, group, world))
    opcheck(torch.ops.torch_mp._matmul_reduce_scatter.default,
            ([torch.randn(2, 4 * world, 8)], [torch.randn(3, 8)], torch.randn(2, 4 * world, 3), 1, 1, group, world))

    # Bad input: a clear error before any collective.
    with pytest.raises(ValueError, match="chunks=3"):
        torch.ops.torch_mp.all_gather_matmul(torch.randn(2, 4, 8), [torch.randn(3, 8)], 1, 3, group, world)
    with pytest.raises(ValueError, match="features dim"):
        torch.ops.torch_mp.all_gather_matmul(torch.randn(2, 4, 8), [torch.randn(3, 8)], -1, 1, group, world)
    with pytest.raises(ValueError, match="weight has shape"):
        torch.ops.torch_mp.all_gather_matmul(torch.randn(2, 4, 8), [torch.randn(3, 5)], 1, 1, group, world)
    with pytest.raises(ValueError, match="not divisible by the group size"):
        torch.ops.torch_mp.matmul_reduce_scatter(torch.randn(2, 3, 8), torch.randn(3, 8), 1, 1, group, world)
    with pytest.raises(ValueError, match="weights is empty"):
        torch.ops.torch_mp.all_gather_matmul(torch.randn(2, 4, 8), [], 1, 1, group, world)


def test_ops_match_the_undecomposed_collectives_on_2_ranks():
    run_ranks(2, check_ops)


def check_public_wrappers(rank, world):
    # The typed wrappers resolve the default group and pass the arguments through.
    shard = torch.randn(2, 4, 8)
    gathered, (product,) = torch_mp.all_gather_matmul(shard, [torch.ones(3, 8)], dim=1, chunks=2)
    assert gathered.shape == (2, 4 * world, 8)
    close(product, gathered.sum(-1, keepdim=True).expand(2, 4 * world, 3))
    reduced = torch_mp.matmul_reduce_scatter(torch.ones(2, 4 * world, 8), torch.ones(3, 8), dim=1, chunks=2)
    close(reduced, torch.full((2, 4, 3), 8.0 * world))
    with pytest.raises(TypeError, match="chunks"):
        torch_mp.all_gather_matmul(shard, [torch.ones(3, 8)], chunks=1.5)


def test_public_wrappers_on_2_ranks():
    run_ranks(2, check_public_wrappers)


def test_ops_at_world_size_1_are_local_matmuls_and_pass_opcheck():
    x, w = torch.randn(2, 4, 8), torch.randn(3, 8)
    gathered, (out,) = torch.ops.torch_mp.all_gather_matmul(x, [w], 1, 2, "", 1)
    assert torch.equal(gathered, x) and gathered.data_ptr() != x.data_ptr()
    close(out, F.linear(x, w))
    close(torch.ops.torch_mp.matmul_reduce_scatter(x, w, 1, 4, "", 1), F.linear(x, w))
    opcheck(torch.ops.torch_mp.all_gather_matmul.default, (leaf(x), [leaf(w), leaf(torch.randn(5, 8))], 1, 2, "", 1))
    opcheck(torch.ops.torch_mp.matmul_reduce_scatter.default, (leaf(x), leaf(w), 1, 2, "", 1))
    for dtype in (torch.float64,):
        gx, gw = leaf(x.to(dtype)), leaf(w.to(dtype))
        torch.autograd.gradcheck(lambda a, b: torch.ops.torch_mp.all_gather_matmul(a, [b], 1, 2, "", 1)[1][0], (gx, gw))
        torch.autograd.gradcheck(lambda a, b: torch.ops.torch_mp.matmul_reduce_scatter(a, b, 1, 2, "", 1), (gx, gw))


# --- tensor_parallel(sequence_parallel=True, async_tp=...) ---------------------------------------

def llama():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32,
                                      use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def train_step(model, ids):
    """Logits, then one SGD step on a squared loss; returns the logits and the gradients by name."""
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    return logits.detach(), grads


def counting_ops(names):
    """A dispatch mode counting calls of torch_mp ops by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = dict.fromkeys(names, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if name in self.calls:
                self.calls[name] += 1
            return func(*args, **(kwargs or {}))
    return Count()


def check_models(rank, world):
    for make in (llama, gpt2):
        torch.manual_seed(0)
        dense = make().train()
        ids = torch.randint(0, 128, (2, 4 * world))
        plain = torch_mp.tensor_parallel(copy.deepcopy(dense), sequence_parallel=True)
        overlapped = {chunks: torch_mp.tensor_parallel(copy.deepcopy(dense), sequence_parallel=True, async_tp=chunks)
                      for chunks in (True, 2)}
        names = ("all_gather_matmul", "matmul_reduce_scatter", "gather_from_sp", "mm", "addmm")
        with counting_ops(names) as count:
            overlapped[True](input_ids=ids)
        with counting_ops(names) as plain_count:
            plain(input_ids=ids)
        # Every attention and MLP of both blocks: one decomposed gather and one decomposed reduce-scatter,
        # and none of the matmuls of their layers outside them (each column-parallel layer takes its
        # product): the rest (rotary embeddings) as in the plain path.
        layers = sum(isinstance(m, (torch_mp.nn.ColumnParallelLinear, torch_mp.nn.RowParallelLinear))
                     and m.sequence_dim is not None for m in plain.modules())
        assert layers == {"llama": 14, "gpt2": 8}[make.__name__]
        outside = plain_count.calls["mm"] + plain_count.calls["addmm"] - layers
        assert count.calls == {"all_gather_matmul": 4, "matmul_reduce_scatter": 4, "gather_from_sp": 0,
                               "mm": outside, "addmm": 0}, (count.calls, plain_count.calls)
        dense_logits, dense_grads = train_step(dense, ids)
        plain_logits, plain_grads = train_step(plain, ids)
        for chunks, model in overlapped.items():
            name = f"{make.__name__} async_tp={chunks}"
            logits, grads = train_step(model, ids)
            close(logits, plain_logits, f"{name} logits against sequence parallel")
            close(logits, dense_logits, f"{name} logits against dense", MODEL_RTOL, MODEL_ATOL)
            assert grads.keys() == plain_grads.keys()
            # Parameters left whole (norms, embeddings; their gradients summed over ranks where they
            # see this rank's tokens only) hold the dense model's gradients.
            replicated = [key for key in grads if isinstance(grads[key], DTensor)
                          and all(p.is_replicate() for p in grads[key].placements)]
            assert any(key.endswith(("norm.weight", "ln_1.weight")) for key in replicated), replicated
            for key in replicated:
                close(grads[key], dense_grads[key], f"{name} {key} grad against dense", MODEL_RTOL, MODEL_ATOL)
            for key in grads:
                close(grads[key], plain_grads[key], f"{name} {key} grad against sequence parallel", MODEL_RTOL,
                      MODEL_ATOL)
            # After the step: the next outputs, and the gathered weights, are the dense model's.
            close(model(input_ids=ids).logits, dense(input_ids=ids).logits, f"{name} after a step",
                  MODEL_RTOL, MODEL_ATOL)
            state = torch_mp.full_state_dict(model)
            for key, value in dense.state_dict().items():
                close(state[key], value, f"{name} {key} after a step", MODEL_RTOL, MODEL_ATOL)

    with pytest.raises(ValueError, match="without sequence parallel blocks"):
        torch_mp.tensor_parallel(llama(), async_tp=True)
    with pytest.raises(ValueError, match="expected a bool or a chunk count"):
        torch_mp.tensor_parallel(llama(), sequence_parallel=True, async_tp=0)


def test_sequence_parallel_models_match_dense_and_the_plain_path_on_2_ranks():
    run_ranks(2, check_models, timeout=280)


def check_compiled(rank, world):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = llama().train()
    ids = torch.randint(0, 128, (2, 4 * world))
    # Each sharded from the dense model (a deep copy of a sharded one would drop its gradient hooks).
    eager, model = (torch_mp.tensor_parallel(copy.deepcopy(dense), sequence_parallel=True, async_tp=True)
                    for _ in range(2))
    eager_logits, eager_grads = train_step(eager, ids)
    _, dense_grads = train_step(dense, ids)
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    code = explanation.graphs[0].code
    assert code.count("torch_mp.all_gather_matmul") == 4 and code.count("torch_mp.matmul_reduce_scatter") == 4, code
    logits, grads = train_step(torch.compile(model), ids)
    close(logits, eager_logits, "compiled logits")
    assert len(grads) == len(eager_grads)
    for key in eager_grads:
        close(grads[f"_orig_mod.{key}"], eager_grads[key], f"compiled {key} grad", MODEL_RTOL, MODEL_ATOL)
    close(torch_mp.full_state_dict(model)["lm_head.weight"], dense.lm_head.weight, "compiled step", MODEL_RTOL,
          MODEL_ATOL)
    # Replicated parameters hold the dense model's gradient: the norms inside the blocks see this
    # rank's tokens only, their gradients summed over the ranks.
    for key in ("model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                "model.norm.weight"):
        close(grads[f"_orig_mod.{key}"], dense_grads[key], f"compiled {key} grad against dense", MODEL_RTOL, MODEL_ATOL)


def test_compiled_async_tp_has_no_graph_break_and_matches_eager():
    run_ranks(2, check_compiled, timeout=280)
