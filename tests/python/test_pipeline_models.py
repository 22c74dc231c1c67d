"""Pipelined splits of the models people have, called the usual way, against the dense model: the
merged output, the loss, every gradient and an SGD step. Every case has a batch that the chunks
do not divide."""
import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks, run_ranks_until_death
from test_pipeline_numbers import Pair

transformers = pytest.importorskip("transformers")


def _non_trivial(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights well away from the initializer's (norms not at one, biases not at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def _tensors(value, prefix=""):
    """(path, tensor) for every tensor in a nested output."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, dict):
        return [item for key in value for item in _tensors(value[key], f"{prefix}.{key}")]
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in _tensors(v, f"{prefix}[{i}]")]
    if dataclasses.is_dataclass(value):
        return [item for f in dataclasses.fields(value) for item in _tensors(getattr(value, f.name), f"{prefix}.{f.name}")]
    return []


def assert_outputs_close(actual, expected):
    got, want = _tensors(actual), _tensors(expected)
    assert [path for path, _ in got] == [path for path, _ in want]
    assert want, "the output holds no tensor"
    for (path, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=path)


def check_parity(model, kwargs, loss_of, chunks=2, schedule="1f1b", checkpoint="never", layers=None,
                 normalizer=None, chunk_spec=None, output_merge=None):
    """Forward, train_step (loss, gradients) and an SGD step of ``split(model, ["cpu", "cpu"],
    chunks=...)`` against ``model``."""
    model.zero_grad(set_to_none=True)
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=chunks, schedule=schedule,
                           checkpoint=checkpoint, layers=layers, chunk_spec=chunk_spec,
                           output_merge=output_merge)
    assert len(set(torch_mp.state_of(piped).stage_of.values())) == 2
    assert_outputs_close(piped(**kwargs), model(**kwargs))

    dense_loss = loss_of(model(**kwargs), None)
    if normalizer is not None:
        dense_loss = dense_loss / normalizer
    dense_loss.backward()
    loss = piped.train_step(**kwargs, loss_fn=loss_of, normalizer=normalizer)
    torch.testing.assert_close(loss, dense_loss.detach(), rtol=1e-5, atol=1e-6)
    checked = 0
    for (name, p), (_, q) in zip(piped.named_parameters(), model.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
        checked += 1
    assert checked > 0
    for m in (piped, model):
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    for (name, p), (_, q) in zip(piped.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)
    assert_outputs_close(piped(**kwargs), model(**kwargs))


# The models' own loss is a mean over samples here (as many tokens in every sequence, no padding),
# so the micro-batches' means merge weighted by their sizes.
MEAN_LOSS = {"loss": "mean"}


def _model_loss(output, _target):
    return output.loss


def gpt2_case():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=97, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = _non_trivial(transformers.GPT2LMHeadModel(config))
    ids = torch.randint(0, 97, (5, 12))
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)


def llama_case():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                      max_position_embeddings=32)
    model = _non_trivial(transformers.LlamaForCausalLM(config))
    ids = torch.randint(0, 97, (5, 12))
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)


def test_gpt2():
    check_parity(*gpt2_case(), _model_loss, chunks=2, checkpoint="except_last", output_merge=MEAN_LOSS)


def test_llama_with_grouped_query_attention():
    check_parity(*llama_case(), _model_loss, chunks=3, schedule="gpipe", output_merge=MEAN_LOSS)


def bert_case():
    """A masked LM whose masked positions differ per sample, and a padded sample."""
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                     num_attention_heads=4, vocab_size=97, max_position_embeddings=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = _non_trivial(transformers.BertForMaskedLM(config))
    ids = torch.randint(0, 97, (5, 12))
    labels = torch.full_like(ids, -100)
    masked = torch.rand(ids.shape) < torch.tensor([0.1, 0.9, 0.3, 0.6, 0.2])[:, None]
    masked[:, 0] = True
    labels[masked] = ids[masked]
    mask = torch.ones_like(ids)
    mask[3, 9:] = 0
    return model, dict(input_ids=ids, attention_mask=mask), labels


def summed_token_loss(output, target):
    return F.cross_entropy(output.logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")


def test_bert_masked_lm_with_token_normalized_loss():
    """Masked positions differ per sample: the loss is summed per micro-batch and divided by the
    batch's count of masked tokens, so micro-batches add up to the whole batch's mean."""
    model, kwargs, labels = bert_case()
    summed = summed_token_loss
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=2, schedule="1f1b")
    assert_outputs_close(piped(**kwargs), model(**kwargs))
    count = int((labels != -100).sum())
    dense = F.cross_entropy(model(**kwargs).logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    dense.backward()
    loss = piped.train_step(**kwargs, target=labels, loss_fn=summed, normalizer=lambda t: (t != -100).sum())
    torch.testing.assert_close(loss, dense.detach(), rtol=1e-5, atol=1e-6)
    assert count < labels.numel()
    for (name, p), (_, q) in zip(piped.named_parameters(), model.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


T5_LAYERS = [f"encoder.block.{i}" for i in range(2)] + [f"decoder.block.{i}" for i in range(2)]


def t5_case():
    torch.manual_seed(0)
    config = transformers.T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                                   vocab_size=97, dropout_rate=0.0, decoder_start_token_id=0)
    model = _non_trivial(transformers.T5ForConditionalGeneration(config))
    ids, labels = torch.randint(0, 97, (5, 10)), torch.randint(0, 97, (5, 7))
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, use_cache=False)


def test_t5_encoder_decoder():
    check_parity(*t5_case(), _model_loss, chunks=2, layers=T5_LAYERS, output_merge=MEAN_LOSS)


def vit_case():
    torch.manual_seed(0)
    config = transformers.ViTConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                    image_size=16, patch_size=4, num_labels=3, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    model = _non_trivial(transformers.ViTForImageClassification(config))
    return model, dict(pixel_values=torch.randn(5, 3, 16, 16), labels=torch.randint(0, 3, (5,)))


def test_vit():
    check_parity(*vit_case(), _model_loss, chunks=2, checkpoint="always", output_merge=MEAN_LOSS)


def test_torch_transformer_encoder():
    """nn.TransformerEncoder branches on is_nested and on its inputs' dtypes and flags; the padding
    mask [B, S] is cut, the causal mask [S, S] passed whole; with S == B the chunk spec says which."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = _non_trivial(nn.TransformerEncoder(layer, 4, enable_nested_tensor=False))
    for length, spec in ((7, None), (5, {"mask": None, "src_key_padding_mask": 0})):
        padding = torch.zeros(5, length, dtype=torch.bool)
        padding[1, 3:] = True
        kwargs = dict(src=torch.randn(5, length, 16), mask=nn.Transformer.generate_square_subsequent_mask(length),
                      src_key_padding_mask=padding)
        check_parity(model, kwargs, lambda out, _: out.square().mean(), chunks=2, chunk_spec=spec)
    with pytest.raises(ValueError, match=r"cannot tell whether input mask \[5, 5\] is batched"):
        torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=2)(**kwargs)
    model.eval()  # the fast path for inference, as without a pipeline
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=2)
    src, padding = torch.randn(5, 7, 16), torch.zeros(5, 7, dtype=torch.bool)
    padding[2, 4:] = True
    with torch.no_grad():
        torch.testing.assert_close(piped(src, src_key_padding_mask=padding), model(src, src_key_padding_mask=padding),
                                   rtol=1e-5, atol=1e-5)


def test_torch_transformer():
    torch.manual_seed(0)
    model = _non_trivial(nn.Transformer(16, 4, 2, 2, 32, dropout=0.0, batch_first=True))
    src, tgt = torch.randn(5, 7, 16), torch.randn(5, 6, 16)
    check_parity(model, dict(src=src, tgt=tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(6),
                             tgt_is_causal=True),
                 lambda out, _: out.square().mean(), chunks=2,
                 layers=[f"encoder.layers.{i}" for i in range(2)] + [f"decoder.layers.{i}" for i in range(2)])


@dataclasses.dataclass
class Result:
    logits: torch.Tensor
    hidden: list
    extra: dict
    note: str


class Flagged(nn.Module):
    """A forward with **kwargs, Python flags (bool, float, None, str), and branches on shapes,
    dtypes and is_nested between its layers; it returns a dataclass of nested containers."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x, scale: float = 1.0, residual: bool = True, mode: str = "tanh", bias=None, **kwargs):
        if x.is_nested:
            raise AssertionError("not nested")
        if x.dtype == torch.float64:
            x = x.float()
        hidden = []
        for i, layer in enumerate(self.layers):
            y = layer(x) * scale
            y = torch.tanh(y) if mode == "tanh" else F.relu(y)
            x = x + y if residual and x.shape[-1] == y.shape[-1] else y
            if kwargs.get("collect") and i % 2:
                hidden.append(x)
            if bias is not None:
                x = x + bias
        return Result(self.head(x), hidden, {"mean": x.mean(), "first": x[:, 0]}, note=mode)


@pytest.mark.parametrize("flags", [dict(), dict(scale=0.5, residual=False, mode="relu", collect=True),
                                   dict(bias=None, collect=False, scale=2.0)])
def test_forward_with_kwargs_python_flags_and_branches(flags):
    torch.manual_seed(0)
    model = Flagged()
    x = torch.randn(5, 8, dtype=torch.float64)
    check_parity(model, dict(x=x, **flags), lambda out, _: out.logits.square().mean() + out.extra["mean"], chunks=3,
                 output_merge={"extra.mean": "mean"})


# --- across ranks: pipeline() runs the same forward on every rank, other ranks' stages on meta ------

def check_parity_across_ranks(rank, world, model, kwargs, loss_of, target=None, normalizer=None, **options):
    """Forward (the last stage's output, on every rank), train_step (loss on every rank, every
    gradient this rank holds) and an SGD step of ``pipeline(model, ...)`` against ``model``."""
    model.zero_grad(set_to_none=True)
    piped = torch_mp.pipeline(copy.deepcopy(model), timeout=60, **options)
    with torch.no_grad():
        output, dense_output = piped(**kwargs), model(**kwargs)
    assert_outputs_close(output, dense_output)  # on every rank, from the last stage's
    dense_loss = loss_of(model(**kwargs), target)
    if normalizer is not None:
        dense_loss = dense_loss / normalizer(target)
    dense_loss.backward()
    loss = piped.train_step(**kwargs, target=target, loss_fn=loss_of, normalizer=normalizer)
    torch.testing.assert_close(loss, dense_loss.detach(), rtol=1e-5, atol=1e-6)
    checked = 0
    for (name, p), (_, q) in zip(piped.named_parameters(), model.named_parameters()):
        if p.is_meta:
            continue
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
        checked += 1
    assert checked > 0
    for m in (piped, model):
        torch.optim.SGD([p for p in m.parameters() if not p.is_meta], lr=0.5).step()
    for (name, p), (_, q) in zip(piped.named_parameters(), model.named_parameters()):
        if not p.is_meta:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)
    with torch.no_grad():
        output, dense_output = piped(**kwargs), model(**kwargs)
    assert_outputs_close(output, dense_output)
    held = [name for name, p in piped.named_parameters() if not p.is_meta]
    assert 0 < len(held) < len(list(piped.named_parameters())), "each rank holds a part of the model"


def _transformers_across_ranks(rank, world):
    check_parity_across_ranks(rank, world, *gpt2_case(), _model_loss, chunks=2, checkpoint="except_last",
                              output_merge=MEAN_LOSS)
    check_parity_across_ranks(rank, world, *llama_case(), _model_loss, chunks=3, schedule="gpipe",
                              output_merge=MEAN_LOSS)
    # Two stages per rank: the rotary embedding (no stage of its own) runs before stage 0.
    check_parity_across_ranks(rank, world, *llama_case(), _model_loss, chunks=3, schedule="interleaved_1f1b",
                              output_merge=MEAN_LOSS)
    model, kwargs, labels = bert_case()
    check_parity_across_ranks(rank, world, model, kwargs, summed_token_loss, target=labels,
                              normalizer=lambda t: (t != -100).sum(), chunks=2)
    check_parity_across_ranks(rank, world, *vit_case(), _model_loss, chunks=2, checkpoint="always",
                              output_merge=MEAN_LOSS)
    check_parity_across_ranks(rank, world, *t5_case(), _model_loss, chunks=2, layers=T5_LAYERS,
                              output_merge=MEAN_LOSS)


def test_transformers_models_across_ranks():
    """GPT-2, Llama (GQA), BERT MLM with a token-normalized loss, ViT, T5: called the usual way
    (keywords, labels=, the model's own loss) under pipeline() on 2 Gloo ranks."""
    run_ranks(2, _transformers_across_ranks, timeout=240)


def _torch_transformers_across_ranks(rank, world):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = _non_trivial(nn.TransformerEncoder(layer, 4, enable_nested_tensor=False))
    padding = torch.zeros(5, 7, dtype=torch.bool)
    padding[1, 3:] = True
    kwargs = dict(src=torch.randn(5, 7, 16), mask=nn.Transformer.generate_square_subsequent_mask(7),
                  src_key_padding_mask=padding)
    check_parity_across_ranks(rank, world, model, kwargs, lambda out, _: out.square().mean(), chunks=2,
                              schedule="interleaved_1f1b")
    torch.manual_seed(0)
    model = _non_trivial(nn.Transformer(16, 4, 2, 2, 32, dropout=0.0, batch_first=True))
    kwargs = dict(src=torch.randn(5, 7, 16), tgt=torch.randn(5, 6, 16),
                  tgt_mask=nn.Transformer.generate_square_subsequent_mask(6), tgt_is_causal=True)
    check_parity_across_ranks(rank, world, model, kwargs, lambda out, _: out.square().mean(), chunks=2,
                              layers=[f"encoder.layers.{i}" for i in range(2)] +
                              [f"decoder.layers.{i}" for i in range(2)])


def test_torch_transformers_across_ranks():
    """nn.TransformerEncoder (branches on is_nested, an interleaved schedule) and nn.Transformer."""
    run_ranks(2, _torch_transformers_across_ranks, timeout=240)


class BranchOnValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 1 and x.sum() > 0:  # a value rank 1 does not compute
                x = -x
        return x


def _structured_across_ranks(rank, world):
    # A dataclass output with lists and dicts, values made by both ranks' stages, **kwargs and flags.
    torch.manual_seed(0)
    flags = dict(scale=0.5, residual=False, mode="relu", collect=True)
    check_parity_across_ranks(rank, world, Flagged(), dict(x=torch.randn(5, 8, dtype=torch.float64), **flags),
                              lambda out, _: out.logits.square().mean() + out.extra["mean"] + out.hidden[0].mean(),
                              chunks=3, layers=[f"layers.{i}" for i in range(4)], output_merge={"extra.mean": "mean"})
    # Tuples crossing the stage boundary: gradients reach both of their tensors.
    torch.manual_seed(0)
    x, y = torch.randn(5, 6), torch.randn(5, 6)
    check_parity_across_ranks(rank, world, nn.Sequential(*(Pair() for _ in range(4))), dict(input=(x, y)),
                              lambda out, _: out[0].square().mean() + out[1].square().mean(), chunks=2)


def _branch_on_values(rank, world):
    torch.manual_seed(0)
    piped = torch_mp.pipeline(BranchOnValues(), chunks=2, timeout=5)
    try:
        piped(torch.randn(4, 4))
    except (ValueError, torch_mp.CollectiveError) as error:
        return type(error).__name__, str(error)
    return None


def test_structured_outputs_and_tuples_across_ranks():
    run_ranks(2, _structured_across_ranks, timeout=120)


def test_a_branch_on_values_another_rank_computes_is_an_error():
    """Rank 1 follows stage 0's output on meta: reading its value is a clear error there; rank 0,
    whose activations are never received, fails with a CollectiveError instead of hanging."""
    results = run_ranks_until_death(2, _branch_on_values, timeout=120)
    assert results[1][0] == "ValueError"
    assert "reads the value of a tensor (__bool__) that rank 1 does not compute" in results[1][1]
    assert results[0][0] == "CollectiveError" and "sending to rank 1" in results[0][1]


class PersistentRotary(nn.Module):
    """A rotary table with a persistent buffer: it owns tensors of state, so the cut gives it a stage."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (100 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, ids):
        angles = torch.outer(torch.arange(ids.shape[1], dtype=torch.float32), self.inv_freq)
        return torch.cat([angles.cos(), angles.sin()], -1)[None]


class RotaryLast(nn.Module):
    """Defined after the layers (cut with the last one), called before the first."""

    def __init__(self, dim=8, vocab=11):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(4))
        self.rotary = PersistentRotary(dim)

    def forward(self, ids):
        rotary = self.rotary(ids)
        x = self.embed(ids)
        for layer in self.layers:
            x = torch.tanh(layer(x) * rotary)
        return x


def _rotary_out_of_order(rank, world):
    piped = torch_mp.pipeline(RotaryLast(), chunks=2, schedule="interleaved_1f1b", timeout=5,
                              layers=[f"layers.{i}" for i in range(4)])
    try:
        piped.train_step(torch.randint(0, 11, (4, 6)), loss_fn=lambda out, _: out.square().mean())
    except (ValueError, torch_mp.CollectiveError) as error:
        return type(error).__name__, str(error)
    return None


def test_a_module_called_before_its_stage_is_named_in_the_error():
    """Rank 1 holds stages 1 and 3 (one layer each, the embedding with stage 0's); the rotary table,
    cut with stage 3, runs first, and its output reaches stage 1's layer: an activation flowing back
    to an earlier stage. Every rank raises a ValueError naming both modules and how to place them,
    instead of hanging."""
    results = run_ranks_until_death(2, _rotary_out_of_order, timeout=120)
    for rank in (0, 1):
        assert results[rank][0] == "ValueError", results
        assert ("calls module 'layers.1' (stage 1) at call 4 of its placed modules on a tensor that stage 3 made "
                "(module 'rotary')") in results[rank][1]
        assert "pass balance= or layers= so that they are" in results[rank][1]
