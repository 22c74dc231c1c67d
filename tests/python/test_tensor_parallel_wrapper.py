"""tensor_parallel on stock models, 2 and 4 Gloo ranks, against the unsharded model."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Shard

import torch_mp
from distributed import run_ranks
from tensors import leaf
from models import GPT

transformers = pytest.importorskip("transformers")


def gpt():
    return GPT(vocab=97, dim=32, heads=4, depth=2, context=16)


def gpt2():
    config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama(tie_word_embeddings=False):
    # Grouped-query attention: 8 query heads share 4 key/value heads.
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32,
                                      use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                      tie_word_embeddings=tie_word_embeddings)
    return transformers.LlamaForCausalLM(config)


def llama_tied():
    return llama(tie_word_embeddings=True)


def bert():
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(config)


class Encoder(nn.Module):
    """nn.TransformerEncoder between an embedding and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(97, 32)
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 97)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)))


MODELS = {"gpt": gpt, "encoder": Encoder, "gpt2": gpt2, "llama": llama, "llama_tied": llama_tied, "bert": bert}
EXPECTED_SHARDED = {  # a few layers auto must find, per model
    "gpt": {"blocks.0.attn.qkv": "qkv", "blocks.0.attn.proj": "rowwise", "blocks.1.mlp.0": "colwise",
            "blocks.1.mlp.2": "rowwise"},
    "encoder": {"encoder.layers.0.self_attn": "colwise", "encoder.layers.0.self_attn.out_proj": "rowwise",
                "encoder.layers.1.linear1": "colwise", "encoder.layers.1.linear2": "rowwise"},
    "gpt2": {"transformer.h.0.attn.c_attn": "qkv", "transformer.h.0.attn.c_proj": "rowwise",
             "transformer.h.1.mlp.c_fc": "colwise", "transformer.h.1.mlp.c_proj": "rowwise"},
    "llama": {"model.embed_tokens": "vocab", "lm_head": "colwise_gather", "model.layers.0.self_attn.k_proj": "colwise", "model.layers.0.self_attn.o_proj": "rowwise",
              "model.layers.1.mlp.gate_proj": "colwise", "model.layers.1.mlp.down_proj": "rowwise"},
    "llama_tied": {"model.embed_tokens": "vocab", "lm_head": "colwise_gather"},
    "bert": {"bert.encoder.layer.0.attention.self.query": "colwise",
             "bert.encoder.layer.0.attention.output.dense": "rowwise",
             "bert.encoder.layer.1.intermediate.dense": "colwise", "bert.encoder.layer.1.output.dense": "rowwise"},
}


def logits_of(model, ids):
    output = model(ids)
    return output if isinstance(output, torch.Tensor) else output.logits


def assert_same_step_and_state(dense, sharded, ids, name):
    """Same outputs, the same outputs again after one optimizer step on each, and a gathered
    full_state_dict with the stock names and shapes and the unsharded model's values."""
    for step in range(2):
        torch.testing.assert_close(logits_of(sharded, ids), logits_of(dense, ids), rtol=1e-4, atol=1e-5,
                                   msg=f"{name} step {step}")
        if step == 0:
            for model in (dense, sharded):
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
                logits_of(model, ids).square().mean().backward()
                optimizer.step()
    gathered = torch_mp.full_state_dict(sharded)
    reference = dense.state_dict()
    assert {k: tuple(v.shape) for k, v in gathered.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    for key in reference:
        torch.testing.assert_close(gathered[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def check_models(rank, world, folder):
    for name, make in MODELS.items():
        torch.manual_seed(0)
        dense = make().train()
        ids = torch.randint(0, 97, (2, 12))
        sharded = torch_mp.tensor_parallel(copy.deepcopy(dense))
        for layer, style in EXPECTED_SHARDED[name].items():
            assert sharded.torch_mp_plan.get(layer) == style, (name, layer, sharded.torch_mp_plan.get(layer))
        assert list(sharded.state_dict()) == list(dense.state_dict())
        if name == "llama_tied":  # the embedding and the LM head split alike and stay one parameter
            assert sharded.lm_head.weight is sharded.model.embed_tokens.weight

        assert_same_step_and_state(dense, sharded, ids, name)
        reference = dense.state_dict()
        make().load_state_dict(torch_mp.full_state_dict(sharded), strict=True)

        # load_full_state_dict is its inverse, from a state_dict and from a safetensors file read by slices.
        fresh = torch_mp.tensor_parallel(make())
        torch_mp.load_full_state_dict(fresh, reference)
        torch.testing.assert_close(logits_of(fresh, ids), logits_of(dense, ids), rtol=1e-4, atol=1e-5)
        if name == "llama":
            path = os.path.join(folder, "llama.safetensors")
            if rank == 0:
                from safetensors.torch import save_file
                save_file({k: v.contiguous() for k, v in reference.items()}, path)
            dist.barrier()
            # Built without memory for its weights, sharded, then only this rank's slices read.
            with torch_mp.init_empty_weights():
                empty = make()
            assert all(p.is_meta for p in empty.parameters())
            fresh = torch_mp.load_full_state_dict(torch_mp.tensor_parallel(empty), path)
            assert not any(p.is_meta for p in fresh.parameters())
            torch.testing.assert_close(logits_of(fresh, ids), logits_of(dense, ids), rtol=1e-4, atol=1e-5)
        if name == "gpt2":  # tied lm_head and wte stay one parameter through materialization
            with torch_mp.init_empty_weights():
                empty = make()
            fresh = torch_mp.load_full_state_dict(torch_mp.tensor_parallel(empty), reference)
            assert fresh.lm_head.weight is fresh.transformer.wte.weight
            torch.testing.assert_close(logits_of(fresh, ids), logits_of(dense, ids), rtol=1e-4, atol=1e-5)


    check_multihead_attention(rank, world)
    check_memory_report(rank, world, folder)
    check_sequence_parallel(rank, world)


def check_sequence_parallel(rank, world):
    """Sequence-parallel blocks: the same outputs and the same step as the unsharded model."""
    for make in (llama, gpt2, gpt):
        torch.manual_seed(0)
        dense = make().train()
        ids = torch.randint(0, 97, (2, 4 * world))
        sharded = torch_mp.tensor_parallel(copy.deepcopy(dense), sequence_parallel=True)
        assert "sequence_parallel" in sharded.torch_mp_plan.values()
        assert_same_step_and_state(dense, sharded, ids, make.__name__)


def check_memory_report(rank, world, folder):
    dense = gpt()
    sharded = torch_mp.tensor_parallel(copy.deepcopy(dense))
    report = torch_mp.memory_report(sharded, png=os.path.join(folder, f"tp{rank}.png"))
    assert [row.where for row in report.rows] == [f"rank {r}" for r in range(world)]
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in sharded.parameters())  # DTensors
    assert report.rows[rank].parameters == local_bytes < dense_bytes  # split layers divided, the rest replicated
    assert len({row.parameters for row in report.rows}) == 1
    with open(os.path.join(folder, f"tp{rank}.png"), "rb") as handle:
        assert handle.read(4) == b"\x89PNG"


def check_multihead_attention(rank, world):
    """Every way of calling nn.MultiheadAttention: self and cross attention, masks, weights."""
    for batch_first in (False, True):
        torch.manual_seed(1)
        dense = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        parallel = torch_mp.nn.TensorParallelMultiheadAttention(dense)
        x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
        if not batch_first:
            x, memory = x.transpose(0, 1), memory.transpose(0, 1)
        padding = torch.zeros(2, 7, dtype=torch.bool)
        padding[1, -2:] = True
        causal = nn.Transformer.generate_square_subsequent_mask(5)
        cases = [((x, x, x), {"need_weights": False, "attn_mask": causal}),
                 ((x, x, x), {"need_weights": True, "is_causal": False}),
                 ((x, memory, memory), {"key_padding_mask": padding, "need_weights": True,
                                        "average_attn_weights": False})]
        for args, kwargs in cases:
            dense_args = [leaf(t) for t in args]
            parallel_args = [leaf(t) for t in args]
            expected, expected_weights = dense(*dense_args, **kwargs)
            actual, actual_weights = parallel(*parallel_args, **kwargs)
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
            if kwargs.get("need_weights"):
                torch.testing.assert_close(actual_weights, expected_weights, rtol=1e-4, atol=1e-5)
            expected.square().sum().backward()
            actual.square().sum().backward()
            for dense_arg, parallel_arg in zip(dense_args, parallel_args):
                torch.testing.assert_close(parallel_arg.grad, dense_arg.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_stock_models_match_unsharded(world, tmp_path):
    run_ranks(world, check_models, str(tmp_path), timeout=400)


def check_bad_plans(rank, world):
    with pytest.raises(ValueError, match="plan pattern 'blocks.*.nothing' matches no module of GPT"):
        torch_mp.tensor_parallel(gpt(), plan={"blocks.*.nothing": "colwise"})
    with pytest.raises(ValueError, match="style 'colwise' for 'blocks.0.ln1', a LayerNorm; expected an nn.Linear"):
        torch_mp.tensor_parallel(gpt(), plan={"blocks.*.ln1": "colwise"})
    with pytest.raises(ValueError, match="style 'vocab' for 'head', a Linear; expected an nn.Embedding"):
        torch_mp.tensor_parallel(gpt(), plan={"head": "vocab"})
    with pytest.raises(ValueError, match="'blocks.0.attn' has heads=3, not divisible by the group size 2"):
        torch_mp.tensor_parallel(GPT(dim=24, heads=3, depth=2))
    with pytest.raises(ValueError, match="ranks \\[1\\] resolved a different plan than rank 0"):
        plan = {"blocks.*.mlp.0": "colwise", "blocks.*.mlp.2": "rowwise"} if rank == 0 else \
            {"blocks.*.mlp.0": "colwise"}
        torch_mp.tensor_parallel(gpt(), plan=plan)
    dist.barrier()


def test_bad_plans_are_clear_errors():
    run_ranks(2, check_bad_plans)


def test_world_of_one_keeps_the_model():
    torch.manual_seed(0)
    dense = gpt()
    ids = torch.randint(0, 97, (2, 8))
    sharded = torch_mp.tensor_parallel(copy.deepcopy(dense))
    torch.testing.assert_close(sharded(ids), dense(ids))
    assert isinstance(sharded.blocks[0].attn.qkv, torch_mp.nn.ColumnParallelLinear)
    for key, value in torch_mp.full_state_dict(sharded).items():
        torch.testing.assert_close(value, dense.state_dict()[key])


def test_shard_and_unshard_are_inverse_with_replicated_parts():
    """Parts cut over the ranks, or held whole by several (KV heads fewer than the ranks): every
    rank's slice is what slice_bounds names, and unshard puts the ranks' slices back together."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from torch_mp._tensor_parallel.sharding import shard, slice_bounds, take_slices, unshard

    @settings(max_examples=60, deadline=None)
    @given(world_log=st.integers(0, 3), data=st.data())
    def check(world_log, data):
        world = 2 ** world_log
        count = data.draw(st.integers(1, 3))
        replicas = tuple(2 ** data.draw(st.integers(0, world_log)) for _ in range(count))
        parts = tuple(world // r * data.draw(st.integers(1, 3)) for r in replicas)
        dim = data.draw(st.integers(0, 1))
        shape = [sum(parts), 3] if dim == 0 else [3, sum(parts)]
        full = torch.randn(shape)
        slices = [shard(full, dim, parts, rank, world, replicas) for rank in range(world)]
        for rank, local in enumerate(slices):
            assert torch.equal(local, take_slices(full, dim, slice_bounds(parts, rank, world, replicas)))
            assert local.shape[dim] == sum(p * r // world for p, r in zip(parts, replicas))
        assert torch.equal(unshard(slices, dim, parts, replicas), full)

    check()


def check_kv_heads_shared_by_ranks(rank, world, folder):
    """Llama (4 query heads, 2 KV heads) on 4 ranks: ranks {0, 1} use KV head 0, {2, 3} head 1. Each
    rank holds 1/4 of k_proj's and v_proj's rows (a Shard(0) DTensor: half of the head its query head
    uses, all-gathered with the other rank using it in the forward), not both heads whole: torch's
    clip_grad_norm_ gives the dense norm (each row counted once, its gradient summed over the two
    ranks), AdamW steps to the dense weights, a save/load round trip is bit-identical, and the
    checkpoint loads into the dense model."""
    import zoo

    dense = zoo.build("llama")
    model = torch_mp.tensor_parallel(copy.deepcopy(dense))
    assert not model.torch_mp_kept_whole
    for layer in range(dense.config.num_hidden_layers):
        attention, dense_attention = model.model.layers[layer].self_attn, dense.model.layers[layer].self_attn
        for proj in ("k_proj", "v_proj"):
            weight, dense_weight = getattr(attention, proj).weight, getattr(dense_attention, proj).weight
            assert weight.placements == (Shard(0),)
            local = weight.to_local()
            assert local.untyped_storage().nbytes() == dense_weight.numel() * dense_weight.element_size() // world
            torch.testing.assert_close(local, dense_weight.chunk(world)[rank], rtol=0, atol=0)
    inputs = zoo.batch("llama")
    torch.testing.assert_close(zoo.output_of(model, inputs), zoo.output_of(dense, inputs), rtol=1e-5, atol=1e-5)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1, eps=1e-3) for m in (dense, model)]
    for step in range(2):
        norms = []
        for m, optimizer in zip((dense, model), optimizers):
            optimizer.zero_grad()
            zoo.output_of(m, inputs).square().mean().backward()
            if m is model:
                norms.append(float(torch_mp.get_total_norm(m)))
            norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)))
            optimizer.step()
        assert norms[1:] == pytest.approx(norms[:1] * 2, rel=1e-5), (step, norms)
    full = torch_mp.full_state_dict(model)
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-4, atol=1e-5, msg=key)
    torch_mp.save(model, folder)
    dist.barrier()
    fresh = torch_mp.tensor_parallel(zoo.build("llama", seed=5))
    torch_mp.load(fresh, folder)
    for (key, value), (fresh_key, fresh_value) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert key == fresh_key and torch.equal(value.to_local(), fresh_value.to_local()), key
    whole = zoo.build("llama", seed=5)
    torch_mp.load(whole, folder)
    for key, value in whole.state_dict().items():
        assert torch.equal(value, full[key]), key


def check_kv_heads_shared_by_ranks_sequence_parallel(rank, world):
    """The same Llama on 4 ranks with sequence parallelism, with and without async TP (k and v take
    their products from the one all_gather_matmul with q, with their gathered weights): the dense
    logits and gradients."""
    import zoo

    dense = zoo.build("llama")
    inputs = zoo.batch("llama")
    for async_tp in (False, True):
        model = torch_mp.tensor_parallel(copy.deepcopy(dense), sequence_parallel=True, async_tp=async_tp)
        for m in (dense, model):
            m.zero_grad()
            zoo.output_of(m, inputs).square().mean().backward()
        torch.testing.assert_close(zoo.output_of(model, inputs), zoo.output_of(dense, inputs), rtol=1e-5, atol=1e-5)
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        for name, p in dense.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=f"async_tp={async_tp} {name}")


def test_kv_heads_shared_by_ranks_are_sharded_and_give_the_dense_numbers(tmp_path):
    run_ranks(4, check_kv_heads_shared_by_ranks, str(tmp_path / "checkpoint"), timeout=400)


def test_kv_heads_shared_by_ranks_under_sequence_parallelism_give_the_dense_numbers():
    run_ranks(4, check_kv_heads_shared_by_ranks_sequence_parallel, timeout=400)
