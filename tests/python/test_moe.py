"""all_to_all and mixture-of-experts blocks (expert and tensor parallel) on Gloo ranks against the
dense computation: Mixtral and Qwen2-MoE from tiny transformers configs with random weights."""
import copy
import itertools

import pytest
import torch
import torch.distributed as dist
from torch.library import opcheck

import torch_mp
from distributed import run_ranks
from tensors import close, leaf
from torch_mp._tensor_parallel import moe
from torch_mp._tensor_parallel.sharding import shard
from torch_mp._group import all_gather_rows
from torch_mp._checkpoint.state_dict import open_source, spec_of, read_local

transformers = pytest.importorskip("transformers")

MODEL_RTOL, MODEL_ATOL = 1e-4, 1e-5  # whole models: sums over experts and ranks in another order


# --- all_to_all ----------------------------------------------------------------------------------

def split_matrix(world):
    """sends[src][dst]: rows rank src sends to rank dst; uneven, with empty sends."""
    return [[(src + 2 * dst) % 3 for dst in range(world)] for src in range(world)]


def check_values_and_gradients(rank, world, sends):
    """Forward and backward of all_to_all for sends[src][dst] rows from rank src to rank dst; returns
    this rank's input, output split sizes, input split sizes and output gradient."""
    # Every rank's input and output gradient, known to every rank (the same seed everywhere).
    inputs = [torch.randn(sum(sends[src]), 3, 2) for src in range(world)]
    grads = [torch.randn(sum(sends[src][rank_] for src in range(world)), 3, 2) for rank_ in range(world)]
    input_splits = sends[rank]
    output_splits = [sends[src][rank] for src in range(world)]

    x = leaf(inputs[rank])
    y = torch_mp.all_to_all(x, output_splits, input_splits)
    expected = torch.cat([inputs[src].split(sends[src])[rank] for src in range(world)])
    close(y, expected, "all_to_all forward")
    y.backward(grads[rank])
    # Rank dst's gradient rows for what this rank sent it, in dst order.
    expected_grad = torch.cat([grads[dst].split([sends[src][dst] for src in range(world)])[rank]
                               for dst in range(world)])
    close(x.grad, expected_grad, "all_to_all backward: the reverse all-to-all")
    return inputs[rank], output_splits, input_splits, grads[rank]


def check_all_to_all(rank, world):
    for _ in range(4):  # random split matrices, the same on every rank
        check_values_and_gradients(rank, world, torch.randint(0, 4, (world, world)).tolist())
    x, output_splits, input_splits, grad = check_values_and_gradients(rank, world, split_matrix(world))

    # The primitive: the same values, no autograd.
    close(torch.ops.torch_mp._all_to_all(x, output_splits, input_splits, dist.group.WORLD.group_name, world),
          torch_mp.all_to_all(x, output_splits, input_splits))

    name = dist.group.WORLD.group_name
    opcheck(torch.ops.torch_mp.all_to_all.default, (leaf(x), output_splits, input_splits, name, world))
    opcheck(torch.ops.torch_mp._all_to_all.default, (x, output_splits, input_splits, name, world))

    # torch.compile: no graph break, the same values and gradients.
    torch._dynamo.reset()

    def route(t):
        return torch_mp.all_to_all(t * 2, output_splits, input_splits).sin()

    explanation = torch._dynamo.explain(route)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    xc, xe = leaf(x), leaf(x)
    yc, ye = torch.compile(route, fullgraph=True)(xc), route(xe)
    close(yc, ye, "compiled all_to_all")
    yc.backward(grad)
    ye.backward(grad)
    close(xc.grad, xe.grad, "compiled all_to_all backward")


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_matches_reference(world):
    run_ranks(world, check_all_to_all)


def test_all_to_all_world_of_one():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    close(torch_mp.all_to_all(x, [5], [5]), x)
    assert torch.autograd.gradcheck(lambda t: torch_mp.all_to_all(t, [5], [5]), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch_mp.all_to_all(t, [5], [5]), (x,))
    opcheck(torch.ops.torch_mp.all_to_all.default, (x, [5], [5], "", 1))
    opcheck(torch.ops.torch_mp._all_to_all.default, (x.detach(), [5], [5], "", 1))
    meta = torch.ops.torch_mp._all_to_all(torch.empty(5, 4, device="meta"), [5], [5], "", 1)
    assert meta.shape == (5, 4) and meta.is_meta


def check_all_to_all_bad_input(rank, world):
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"output_split_sizes has 1 entries; expected one per member of the group \(2\)"):
        torch_mp.all_to_all(x, [4], [2, 2])
    with pytest.raises(ValueError, match="input_split_sizes \\[5, -1\\] holds a negative size"):
        torch_mp.all_to_all(x, [2, 2], [5, -1])
    with pytest.raises(ValueError, match="input_split_sizes \\[1, 2\\] sum to 3 but the input has 4 rows"):
        torch_mp.all_to_all(x, [2, 2], [1, 2])
    with pytest.raises(ValueError, match="input is a 0-dim tensor"):
        torch_mp.all_to_all(torch.tensor(1.0), [0, 0], [0, 0])
    with pytest.raises(TypeError, match="expected input_split_sizes to be a list of ints"):
        torch_mp.all_to_all(x, [2, 2], [2.0, 2])
    dist.barrier()


def test_all_to_all_bad_input_is_a_clear_error():
    run_ranks(2, check_all_to_all_bad_input)


# --- MoE models ----------------------------------------------------------------------------------

def mixtral(num_experts=4, heads=4, kv_heads=2):
    config = transformers.MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, num_local_experts=num_experts, num_experts_per_tok=2,
        max_position_embeddings=32, output_router_logits=True, router_aux_loss_coef=0.1, use_cache=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return randomized(transformers.MixtralForCausalLM(config))


def qwen2_moe():
    # Four routed experts, top-2, and a shared expert (left replicated by transformers' plan) behind a
    # gate; layer 1 a dense MLP, which the plan shards colwise/rowwise.
    config = transformers.Qwen2MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1], max_position_embeddings=32,
        output_router_logits=True, router_aux_loss_coef=0.1, use_cache=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=0)
    return randomized(transformers.Qwen2MoeForCausalLM(config))


def randomized(model):
    """Weights large enough that every expert's output matters and routing is far from ties."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 3:  # the experts' weights
                parameter.normal_(0, 0.2)
        for block in moe.moe_blocks(model):
            model.get_submodule(block).gate.weight.normal_(0, 0.5)
    return model.train()


MODELS = {"mixtral": mixtral, "mixtral_3_experts": lambda: mixtral(num_experts=3),
          "mixtral_4_kv_heads": lambda: mixtral(kv_heads=4), "qwen2_moe": qwen2_moe}


def local_grads(sharded, dense_grads, rank, world):
    """This rank's part of each dense gradient, in the layout of the sharded model's parameters."""
    keys, read_full, read_slices = open_source(dense_grads)
    return {key: read_local(key, *spec_of(key, torch_mp.state_of(sharded).specs), rank, world, read_full, read_slices)
            for key in keys}


def run_step(model, ids):
    output = model(ids, labels=ids)
    output.loss.backward()
    return output


def assert_moe_parity(make, rank, world, style):
    torch.manual_seed(0)
    dense = make()
    ids = torch.randint(0, 96, (2, 7))  # 14 tokens: uneven blocks of tokens on 4 ranks
    sharded = torch_mp.tensor_parallel(copy.deepcopy(dense))
    experts = [key for key in torch_mp.state_of(sharded).specs if ".experts." in key]
    assert experts and {sharded.torch_mp_plan[key] for key in experts} == (
        {"ep"} if style == "ep" else {"packed_colwise", "rowwise"})
    assert list(sharded.state_dict()) == list(dense.state_dict())

    expected, actual = run_step(dense, ids), run_step(sharded, ids)
    close(actual.logits, expected.logits, "logits", MODEL_RTOL, MODEL_ATOL)
    close(actual.aux_loss, expected.aux_loss, "load-balancing loss", MODEL_RTOL, MODEL_ATOL)
    close(actual.loss, expected.loss, "loss (with the load-balancing loss)", MODEL_RTOL, MODEL_ATOL)
    for layer, (a, e) in enumerate(zip(actual.router_logits, expected.router_logits)):
        close(a, e, f"router logits of layer {layer}", MODEL_RTOL, MODEL_ATOL)
    dense_grads = {key: p.grad for key, p in dense.named_parameters()}
    expected_grads = local_grads(sharded, dense_grads, rank, world)
    for key, parameter in sharded.named_parameters():
        close(parameter.grad, expected_grads[key], f"gradient of {key}", MODEL_RTOL, MODEL_ATOL)
    # The replicated router's gradient is the same on every rank (nothing summed twice or missed).
    router = sharded.get_submodule(moe.moe_blocks(sharded)[0]).gate.weight.grad.to_local()
    assert all(torch.equal(g, router) for g in all_gather_rows(router, None, "test"))

    # SGD: Adam's first step is lr * sign(gradient), which turns rounding noise in gradients near 0 into
    # whole steps.
    for model in (dense, sharded):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    close(sharded(ids).logits, dense(ids).logits, "logits after one SGD step", MODEL_RTOL, MODEL_ATOL)

    gathered_state = torch_mp.full_state_dict(sharded)
    reference = dense.state_dict()
    assert {k: tuple(v.shape) for k, v in gathered_state.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    for key in reference:
        close(gathered_state[key], reference[key], f"full_state_dict {key}", MODEL_RTOL, MODEL_ATOL)
    fresh_dense = make()
    fresh_dense.load_state_dict(gathered_state, strict=True)
    with torch_mp.init_empty_weights():  # sharded on the meta device, then only this rank's slices loaded
        empty = make()
    fresh = torch_mp.load_full_state_dict(torch_mp.tensor_parallel(empty), reference, strict=True)
    assert not any(p.is_meta for p in fresh.parameters())
    close(fresh(ids).logits, dense(ids).logits, "load_full_state_dict round trip", MODEL_RTOL, MODEL_ATOL)


def check_models(rank, world, names_and_styles):
    for name, style in names_and_styles:
        assert_moe_parity(MODELS[name], rank, world, style)


def test_moe_models_match_dense_on_2_ranks():
    # Four experts on two ranks: expert parallel; three: each expert cut (tensor parallel).
    run_ranks(2, check_models, [("mixtral", "ep"), ("mixtral_3_experts", "tp"), ("qwen2_moe", "ep")], timeout=280)


def test_mixtral_expert_parallel_on_4_ranks():
    run_ranks(4, check_models, [("mixtral_4_kv_heads", "ep")], timeout=280)


def check_save_and_load(rank, world, folder):
    for make in (mixtral, lambda: mixtral(num_experts=3)):  # experts whole per rank, then cut
        torch.manual_seed(0)
        dense = make()
        ids = torch.randint(0, 96, (2, 7))
        torch_mp.save(torch_mp.tensor_parallel(copy.deepcopy(dense)), folder)
        torch.manual_seed(1)  # other weights, replaced by the checkpoint's
        fresh = torch_mp.tensor_parallel(make())
        torch_mp.load(fresh, folder)
        close(fresh(ids).logits, dense(ids).logits, "torch_mp.save / load round trip", MODEL_RTOL, MODEL_ATOL)
        dist.barrier()  # every rank has read the checkpoint before the next one overwrites it


def test_moe_save_and_load(tmp_path):
    run_ranks(2, check_save_and_load, str(tmp_path / "checkpoint"))


# --- one block, both styles ------------------------------------------------------------------------

def check_block_styles(rank, world):
    torch.manual_seed(0)
    dense = mixtral().model.layers[0].mlp
    # 15 tokens; then one (a decoding step of one sequence): rank 1 routes no tokens of its own.
    for x, style in itertools.product((torch.randn(3, 5, 32), torch.randn(1, 1, 32)), ("ep", "tp")):
        block = copy.deepcopy(dense)
        specs = moe.parallelize_moe_block(block, style=style)
        assert set(specs) == {"experts.gate_up_proj", "experts.down_proj"}
        xd, xs = leaf(x), leaf(x)
        yd, ys = dense(xd), block(xs)
        close(ys, yd, f"{style} block forward")
        grad = torch.randn_like(yd)
        yd.backward(grad)
        ys.backward(grad)
        close(xs.grad, xd.grad, f"{style} input gradient")
        close(block.gate.weight.grad, dense.gate.weight.grad, f"{style} router gradient")
        for weight in ("gate_up_proj", "down_proj"):
            spec = specs[f"experts.{weight}"]
            local = shard(getattr(dense.experts, weight).grad, spec.dim, spec.parts, rank, world)
            close(getattr(block.experts, weight).grad, local, f"{style} {weight} gradient")
        dense.zero_grad()


def test_block_styles_match_dense():
    run_ranks(2, check_block_styles)


def check_block_errors(rank, world):
    block = mixtral(num_experts=3).model.layers[0].mlp
    with pytest.raises(ValueError, match="has 3 experts, not divisible by the group size 2"):
        moe.parallelize_moe_block(copy.deepcopy(block), style="ep", name="layers.0.mlp")
    block.experts.intermediate_dim = 47
    block.experts.down_proj = torch.nn.Parameter(torch.zeros(3, 32, 47))
    with pytest.raises(ValueError, match="'layers.0.mlp'.experts \\(MixtralExperts\\) has gate_up_proj"):
        moe.parallelize_moe_block(block, style="tp", name="layers.0.mlp")
    with pytest.raises(ValueError, match="sequence_parallel=True with mixture-of-experts blocks"):
        torch_mp.tensor_parallel(mixtral(), sequence_parallel=True)
    dist.barrier()


def test_block_errors_are_clear():
    run_ranks(2, check_block_errors)
