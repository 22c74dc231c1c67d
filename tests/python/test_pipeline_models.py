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
                 normalizer=None, chunk_spec=None):
    """Forward, train_step (loss, gradients) and an SGD step of ``split(model, ["cpu", "cpu"],
    chunks=...)`` against ``model``."""
    model.zero_grad(set_to_none=True)
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=chunks, schedule=schedule,
                           checkpoint=checkpoint, layers=layers, chunk_spec=chunk_spec)
    assert len(set(piped._torch_mp_stage_of.values())) == 2
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


def _model_loss(output, _target):
    return output.loss


def test_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=97, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = _non_trivial(transformers.GPT2LMHeadModel(config))
    ids = torch.randint(0, 97, (5, 12))
    check_parity(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False),
                 _model_loss, chunks=2, checkpoint="except_last")


def test_llama_with_grouped_query_attention():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                      max_position_embeddings=32)
    model = _non_trivial(transformers.LlamaForCausalLM(config))
    ids = torch.randint(0, 97, (5, 12))
    check_parity(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False),
                 _model_loss, chunks=3, schedule="gpipe")


def test_bert_masked_lm_with_token_normalized_loss():
    """Masked positions differ per sample: the loss is summed per micro-batch and divided by the
    batch's count of masked tokens, so micro-batches add up to the whole batch's mean."""
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

    def summed(output, target):
        return F.cross_entropy(output.logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")

    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=2, schedule="1f1b")
    kwargs = dict(input_ids=ids, attention_mask=mask)
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


def test_t5_encoder_decoder():
    torch.manual_seed(0)
    config = transformers.T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                                   vocab_size=97, dropout_rate=0.0, decoder_start_token_id=0)
    model = _non_trivial(transformers.T5ForConditionalGeneration(config))
    ids, labels = torch.randint(0, 97, (5, 10)), torch.randint(0, 97, (5, 7))
    layers = [f"encoder.block.{i}" for i in range(2)] + [f"decoder.block.{i}" for i in range(2)]
    check_parity(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, use_cache=False),
                 _model_loss, chunks=2, layers=layers)


def test_vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                    image_size=16, patch_size=4, num_labels=3, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    model = _non_trivial(transformers.ViTForImageClassification(config))
    check_parity(model, dict(pixel_values=torch.randn(5, 3, 16, 16), labels=torch.randint(0, 3, (5,))),
                 _model_loss, chunks=2, checkpoint="always")


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
    check_parity(model, dict(x=x, **flags), lambda out, _: out.logits.square().mean() + out.extra["mean"], chunks=3)
