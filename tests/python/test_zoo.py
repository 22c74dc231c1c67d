"""The model zoo (zoo.py) against the dense models: split on two CPU stages, and
tensor_parallel(plan="auto") on 2 (every model) and 4 (a few) Gloo ranks: forward, one optimizer
step, full_state_dict loaded strictly, the share of parameters held locally, generate() for causal
LMs. Models the issue's kinds of failure need run in `make test`; the rest are marked zoo_full and
run in `make test-zoo` (`pytest -m zoo_full`)."""
import pytest

import zoo
from distributed import run_ranks

pytest.importorskip("transformers")

# One model per kind of failure tensor_parallel must get right (issue 12) and a few plain ones.
REPRESENTATIVE = ["gemma2",      # 1 a scaled embedding subclass; padding_idx
                  "qwen3",       # 2 replicated_with_grad_allreduce (q_norm, k_norm)
                  "falcon",      # 3 fused qkv interleaved per head
                  "t5",          # 4 a per-head relative position bias
                  "falcon_mqa",  # 5 one KV head, fewer than the ranks
                  "mixtral",     # 6 mixture of experts: experts whole per rank, tokens routed with all_to_all
                  "bart",        # 7 an encoder and a decoder stack
                  "nanogpt",     # 8 reshapes with a full-width attribute: that attention stays whole
                  "llama", "gpt2", "tv_vit_b_16"]
FULL = [name for name in zoo.BUILDERS if name not in REPRESENTATIVE]
FOUR_RANKS = ["llama", "falcon_mqa", "falcon_gqa", "t5", "qwen3", "gemma2",
              "mixtral"]  # generate() on 4 ranks: a step of 2 tokens leaves 2 ranks none to route


def check_models(rank, world, names):
    for name in names:
        zoo.check_tensor_parallel(name, rank, world)


def test_tensor_parallel_representative_on_2_ranks():
    run_ranks(2, check_models, REPRESENTATIVE, timeout=280)


@pytest.mark.zoo_full
def test_tensor_parallel_whole_zoo_on_2_ranks():
    run_ranks(2, check_models, FULL, timeout=280)


def test_tensor_parallel_on_4_ranks():
    run_ranks(4, check_models, FOUR_RANKS, timeout=280)


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_split(name):
    zoo.check_split(name)


@pytest.mark.zoo_full
@pytest.mark.parametrize("name", FULL)
def test_split_whole_zoo(name):
    zoo.check_split(name)


def check_each_kind_is_handled_as_documented(rank, world):
    """What tensor_parallel did for each kind, beyond parity (which the zoo asserts)."""
    import copy

    import torch

    import torch_mp

    # 1: Gemma 2's embedding keeps its class (and its scale); padding_idx's row gets no gradient
    # (Llama: its LM head, not tied, adds none either).
    model = torch_mp.tensor_parallel(zoo.build("gemma2"))
    assert model.torch_mp_plan["model.embed_tokens"] == "vocab"
    assert type(model.model.embed_tokens).__name__ == "VocabParallelGemma2TextScaledWordEmbedding"
    model = torch_mp.tensor_parallel(zoo.build("llama"))
    assert model.model.embed_tokens.padding_idx == 0
    zoo.output_of(model, {"input_ids": torch.tensor([[0, 5, 0, 70]])}).square().sum().backward()
    grad = model.model.embed_tokens.weight.grad.to_local()  # a DTensor: indexing it would be a collective
    if rank == 0:  # rank 0 holds row 0, the padding row
        assert grad[0].abs().max() == 0 and grad[5].abs().max() > 0
    # 2: Qwen 3's per-head norms: their gradient summed; a style torch_mp does not know is refused.
    model = zoo.build("qwen3")
    assert torch_mp.tensor_parallel(copy.deepcopy(model)).torch_mp_plan["model.layers.0.self_attn.q_norm"] == \
        "replicated_with_grad_allreduce"
    # ... once, also under sequence parallelism (which sums the norms outside the attention).
    sequence_parallel = torch_mp.tensor_parallel(copy.deepcopy(model), sequence_parallel=True)
    dense, inputs = copy.deepcopy(model), zoo.batch("qwen3")
    zoo._step(dense, inputs)
    zoo._step(sequence_parallel, inputs)
    zoo.close(zoo.output_of(sequence_parallel, inputs), zoo.output_of(dense, inputs), "qwen3 sequence parallel step")
    model.tp_plan = {**model.tp_plan, "model.layers.*.post_attention_layernorm": "embedding_colwise"}
    with pytest.raises(ValueError, match="gives 'model.layers.\\*.post_attention_layernorm' the style "
                                         "'embedding_colwise', which torch_mp does not implement"):
        torch_mp.tensor_parallel(model)
    # 3: Falcon's fused qkv interleaved per head, cut by heads (q|k|v of each rank's heads).
    model = torch_mp.tensor_parallel(zoo.build("falcon"))
    assert model.torch_mp_plan["transformer.h.0.self_attention.query_key_value"] == "colwise"
    assert not model.torch_mp_kept_whole
    # 5: one KV head on 2 ranks: q sharded next to a k and v every rank holds whole, in one weight,
    # is a layout no DTensor placement describes (torch's clip_grad_norm_ would count k and v once per
    # rank): the attention stays whole and says why; the MLP is still sharded.
    model = torch_mp.tensor_parallel(zoo.build("falcon_mqa"))
    attention = "transformer.h.0.self_attention"
    assert "no DTensor placement describes" in model.torch_mp_kept_whole[attention]
    assert model.get_submodule(f"{attention}.query_key_value").weight.shape == (48, 32)
    assert model.torch_mp_plan["transformer.h.0.mlp.dense_h_to_4h"] == "colwise"
    # 4: T5's relative position bias cut with the heads.
    model = torch_mp.tensor_parallel(zoo.build("t5"))
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    assert model.torch_mp_plan[bias] == "heads" and model.get_submodule(bias).weight.to_local().shape == (8, 4 // world)
    # 6: Mixtral's MoE blocks: the router replicated, the 4 experts whole per rank (2 each).
    model = torch_mp.tensor_parallel(zoo.build("mixtral"))
    plan, mlp = model.torch_mp_plan, model.model.layers[0].mlp
    assert plan["model.layers.0.mlp"] == "moe" and plan["model.layers.1.mlp.experts.down_proj"] == "ep"
    assert mlp.gate.weight.shape == (4, 32) and not model.torch_mp_kept_whole
    assert mlp.experts.num_experts == 4 // world and mlp.experts.gate_up_proj.to_local().shape[0] == 4 // world
    # ... the same from a plan the caller gives (attention then stays whole); "moe" elsewhere is refused.
    model = torch_mp.tensor_parallel(zoo.build("mixtral"), plan={"model.layers.*.mlp": "moe"})
    assert model.torch_mp_plan["model.layers.1.mlp"] == "moe"
    assert "model.layers.0.self_attn.q_proj" not in model.torch_mp_plan
    with pytest.raises(ValueError, match="'model.layers.0.self_attn' \\(MixtralAttention\\) is not a "
                                         "mixture-of-experts block"):
        torch_mp.tensor_parallel(zoo.build("mixtral"), plan={"model.layers.*.self_attn": "moe"})
    # ... and experts in another layout are refused, naming the blocks.
    model = zoo.build("mixtral")
    model.model.layers[1].mlp.experts = torch.nn.ModuleList([torch.nn.Linear(32, 32) for _ in range(4)])
    with pytest.raises(ValueError, match="mixture-of-experts blocks \\['model.layers.1.mlp'\\] of "
                                         "MixtralForCausalLM .* hold their experts in another layout"):
        torch_mp.tensor_parallel(model)
    # 7: both of BART's stacks.
    plan = torch_mp.tensor_parallel(zoo.build("bart")).torch_mp_plan
    assert plan["model.encoder.layers.0.fc1"] == plan["model.decoder.layers.1.self_attn.q_proj"] == "colwise"
    # 8: nanoGPT's attention stays whole and says why; its MLPs are sharded.
    model = torch_mp.tensor_parallel(zoo.build("nanogpt"))
    assert set(model.torch_mp_kept_whole) == {"h.0.attn", "h.1.attn"}
    assert "expected 3, got 2" in model.torch_mp_kept_whole["h.0.attn"]
    assert "h.0.attn.c_attn" in model.torch_mp_replicated and model.torch_mp_plan["h.0.mlp.0"] == "colwise"
    # ... and a plan the caller gives that cannot run is an error naming the module.
    with pytest.raises(ValueError, match="'h.0.attn' fails on this rank's shards in a dry run on fake tensors "
                                         "\\(ValueError: not enough values to unpack"):
        torch_mp.tensor_parallel(zoo.build("nanogpt"), plan={"h.*.attn.c_attn": "qkv", "h.*.attn.c_proj": "rowwise"})


def test_each_kind_is_handled_as_documented():
    run_ranks(2, check_each_kind_is_handled_as_documented, timeout=200)
