"""Parameters of tensor_parallel models are DTensors, so torch's own training utilities see global
values (issue 21, items 1 and 4): ``torch.nn.utils.clip_grad_norm_`` returns the dense model's norm on
every rank and clips to the dense gradients, optimizers then step to the dense parameters, and the
replicated parameters stay identical on every rank. Fused layouts are described exactly
(``_StridedShard``) or kept whole.
2 Gloo ranks, tiny transformers configs with random non-trivial weights (zoo.build)."""
import copy

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

import torch_mp
import zoo
from distributed import run_ranks

pytest.importorskip("transformers")


def _loss(model, name, inputs):
    return model(**inputs, labels=inputs["input_ids"]).loss


def _replicas_agree(model):
    """Every Replicate parameter is bit-identical on every rank."""
    for name, param in model.named_parameters():
        if isinstance(param, DTensor) and all(isinstance(p, Replicate) for p in param.placements):
            local = param.to_local().detach().contiguous()
            gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, local)
            for other in gathered[1:]:
                assert torch.equal(other, gathered[0]), f"{name} differs between ranks"


def _trains_like_dense(name, dense, model, optimizer_class, max_norm=0.5, steps=3, **optimizer_kwargs):
    """``steps`` steps of: backward, torch's clip_grad_norm_ (the norm equal to the dense one on every
    rank), an optimizer step; then the gathered parameters equal the dense ones."""
    inputs = zoo.batch(name)
    optimizers = [optimizer_class(m.parameters(), lr=0.05, **optimizer_kwargs) for m in (dense, model)]
    for step in range(steps):
        norms = []
        for m, optimizer in zip((dense, model), optimizers):
            optimizer.zero_grad()
            _loss(m, name, inputs).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm))
        assert isinstance(norms[1], DTensor)
        torch.testing.assert_close(float(norms[1]), float(norms[0]), rtol=1e-5, atol=0,
                                   msg=f"{name} step {step}: clip_grad_norm_")
        for optimizer in optimizers:
            optimizer.step()
        _replicas_agree(model)
    full = torch_mp.full_state_dict(model)
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-4, atol=1e-5, msg=f"{name} after {steps} steps: {key}")


# AdamW divides by sqrt(v) + eps: with a larger eps, gradients that differ from the dense ones by
# float rounding (summed in another order) move the parameters by as little.
ADAMW = {"weight_decay": 0.1, "eps": 1e-3}


def check_clip_and_step(rank, world):
    # Llama (grouped-query attention), GPT-2 (fused q|k|v Conv1D), Mixtral (experts) and sequence
    # parallelism; SGD and AdamW with weight decay.
    for name, sequence_parallel, optimizer, kwargs in [
            ("llama", False, torch.optim.SGD, {}), ("llama", False, torch.optim.AdamW, ADAMW),
            ("gpt2", False, torch.optim.AdamW, ADAMW), ("mixtral", False, torch.optim.SGD, {}),
            ("llama", True, torch.optim.AdamW, ADAMW)]:
        dense = zoo.build(name)
        model = torch_mp.tensor_parallel(copy.deepcopy(dense), sequence_parallel=sequence_parallel)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        _trains_like_dense(name, dense, model, optimizer, **kwargs)


def test_clip_grad_norm_and_optimizers_give_the_dense_numbers():
    run_ranks(2, check_clip_and_step, timeout=400)


class GatedMLP(nn.Module):
    """gate|up fused in one linear (packed_colwise), then down."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(16, 8)

    def forward(self, x):
        gate, up = self.up(x).chunk(2, -1)
        return self.down(torch.nn.functional.silu(gate) * up)


def _norm_after_backward(model, loss_fn):
    model.zero_grad()
    loss_fn(model).backward()
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))


def check_layouts(rank, world):
    # q|k|v in thirds (GPT-2's Conv1D): each third sharded; full_tensor() is the dense weight in the
    # layer's [out, in] layout.
    dense = zoo.build("gpt2")
    model = torch_mp.tensor_parallel(copy.deepcopy(dense))
    weight = model.transformer.h[0].attn.c_attn.weight
    assert weight.placements == (_StridedShard(0, split_factor=3),)
    torch.testing.assert_close(weight.full_tensor(), dense.transformer.h[0].attn.c_attn.weight.t())
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.bias.full_tensor(),
                               dense.transformer.h[0].attn.c_attn.bias)
    # gate|up in halves.
    torch.manual_seed(0)
    dense = GatedMLP()
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_()
    model = torch_mp.tensor_parallel(copy.deepcopy(dense), plan={"up": "packed_colwise", "down": "rowwise"})
    assert model.up.weight.placements == (_StridedShard(0, split_factor=2),)
    torch.testing.assert_close(model.up.weight.full_tensor(), dense.up.weight)
    x = torch.randn(3, 8)
    torch.testing.assert_close(_norm_after_backward(model, lambda m: m(x).square().sum()),
                               _norm_after_backward(dense, lambda m: m(x).square().sum()), rtol=1e-5, atol=0)
    # One KV head on 2 ranks: each rank holds half of k's and v's rows (Shard(0), gathered in the
    # forward), not the whole head.
    config = dict(zoo._LLAMA_LIKE, num_key_value_heads=1)
    torch.manual_seed(0)
    import transformers
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=zoo.VOCAB, **config))
    model = torch_mp.tensor_parallel(copy.deepcopy(dense))
    assert model.model.layers[0].self_attn.k_proj.weight.placements == (Shard(0),)
    assert model.model.layers[0].self_attn.k_proj.weight.to_local().shape[0] == config["hidden_size"] // 4 // world
    assert model.model.layers[0].self_attn.q_proj.weight.placements == (Shard(0),)
    inputs = zoo.batch("llama")
    torch.testing.assert_close(_norm_after_backward(model, lambda m: _loss(m, "llama", inputs)),
                               _norm_after_backward(dense, lambda m: _loss(m, "llama", inputs)), rtol=1e-5, atol=0)
    # Falcon multi-query: q sharded, its one k and v head on every rank, in one weight: no placement
    # describes it. plan="auto" keeps the attention whole (and says why); a plan given is refused.
    dense = zoo.build("falcon_mqa")
    model = torch_mp.tensor_parallel(copy.deepcopy(dense))
    attention = "transformer.h.0.self_attention"
    assert "no DTensor placement" in model.torch_mp_kept_whole[attention]
    assert model.get_submodule(f"{attention}.query_key_value").weight.placements == (Replicate(),)
    inputs = zoo.batch("falcon_mqa")
    torch.testing.assert_close(_norm_after_backward(model, lambda m: _loss(m, "falcon_mqa", inputs)),
                               _norm_after_backward(dense, lambda m: _loss(m, "falcon_mqa", inputs)), rtol=1e-5,
                               atol=0)
    with pytest.raises(ValueError, match="query_key_value.*no DTensor placement describes"):
        torch_mp.tensor_parallel(copy.deepcopy(dense), plan={"transformer.h.*.self_attention.query_key_value": "qkv",
                                                             "transformer.h.*.self_attention.dense": "rowwise"})


def test_fused_and_replicated_layouts_count_every_dense_element_once():
    run_ranks(2, check_layouts, timeout=400)


def check_issue_llama(rank, world):
    """Issue 21, item 1: torch's own clip_grad_norm_ on the issue's Llama (hidden 32, 2 layers, 4
    heads, 2 KV heads) returns the dense norm on both ranks, and after SGD the weights are the dense
    ones, model.norm.weight the same on both ranks. (The issue's batch and loss, which gave the dense
    2.382 against 2.074 / 1.854, are not given; zoo's batch and squared logits give 1.5796, and
    before the DTensor parameters each rank's own norm was below it.)"""
    dense = zoo.build("llama")
    model = torch_mp.tensor_parallel(copy.deepcopy(dense))
    inputs = zoo.batch("llama")
    norms = []
    for m in (dense, model):
        zoo.output_of(m, inputs).square().mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)))
        torch.optim.SGD(m.parameters(), lr=1.0).step()
    assert abs(norms[0] - 1.5796) < 5e-4, norms[0]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    _replicas_agree(model)
    full = torch_mp.full_state_dict(model)
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_torch_clip_grad_norm_on_the_issues_llama_is_the_dense_norm():
    run_ranks(2, check_issue_llama)


def check_adafactor_refused(rank, world):
    import transformers.optimization

    for optimizer_class, kwargs in [(torch.optim.Adafactor, {}),
                                    (transformers.optimization.Adafactor, {"lr": 0.01, "relative_step": False})]:
        model = torch_mp.tensor_parallel(zoo.build("llama"))
        optimizer = optimizer_class(model.parameters(), **kwargs)
        inputs = zoo.batch("llama")
        _loss(model, "llama", inputs).backward()
        before = {name: p.to_local().clone() for name, p in model.named_parameters()}
        with pytest.raises(ValueError, match=r"Adafactor.step: optimizer = Adafactor, whose update factors .* holds "
                                             r"the DTensor parameter of shape"):
            optimizer.step()
        assert all(torch.equal(p.to_local(), before[name]) for name, p in model.named_parameters())


def test_adafactor_on_tensor_parallel_is_refused_at_its_first_step():
    """Issue 21, item 9 / README: Adafactor's row and column statistics of a sharded parameter are
    not the dense model's (and DTensor has no rules for them: torch's raised a RuntimeError in an
    in-place pow, transformers' on mixed tensors); refused by name before it changes anything."""
    run_ranks(2, check_adafactor_refused)
