"""Across ranks, another rank's module runs on meta once per kind of call: later micro-batches and
steps with the same shapes, plain arguments and modes reuse what it returned, with the dense
model's numbers."""
import copy

import torch
from torch import nn

import torch_mp
from distributed import run_ranks


class Note:
    """An argument that is not a plain value: the module's meta forward runs on every call."""


class Block(nn.Module):
    """Returns its input (a pass-through), a new tensor, and that tensor again; counts its calls."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.calls = 0

    def forward(self, x, keep: int, note=None):
        self.calls += 1
        y = torch.tanh(self.linear(x))[:, :keep]  # x [B, S, 6]: the first `keep` positions go on
        return x, y, y


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(4))

    def forward(self, x, keep: int = 4, note=None):
        for i, block in enumerate(self.blocks):
            skip, y, again = block(x, keep, note if i == 3 else None)
            x = y + 0.5 * again + skip[:, :y.shape[1]]
        return x


def _stand_ins_across_steps(rank, world):
    torch.manual_seed(0)
    model = Chain()
    piped = torch_mp.pipeline(copy.deepcopy(model), chunks=2, layers=[f"blocks.{i}" for i in range(4)], timeout=60)
    note = Note()
    steps = (4, 4, 2)  # keep: a Python argument that changes the shapes in the third step
    for keep in steps:
        x = torch.randn(5, 6, 6)  # micro-batches of 3 and 2 samples
        loss = piped.train_step(x, keep, note, loss_fn=lambda out, _: out.square().mean())
        expected = model(x, keep, note).square().mean()
        expected.backward()
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
        checked = 0
        for (name, p), (_, q) in zip(piped.named_parameters(), model.named_parameters()):
            if not p.is_meta:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
                checked += 1
        assert checked == 4, "each rank holds two blocks"
        for m in (piped, model):
            torch.optim.SGD([p for p in m.parameters() if not p.is_meta], lr=0.5).step()
            m.zero_grad(set_to_none=True)
    forwards = len(steps) * 2
    for i, block in enumerate(piped.blocks):
        if not block.linear.weight.is_meta:
            assert block.calls == forwards, (i, block.calls)  # computed for every micro-batch
        elif i == 3:
            assert block.calls == forwards, (i, block.calls)  # given a Note: run on meta every time
        else:
            # Input shapes (3 or 2 samples) x keep (4 or 2): four kinds of call, each run once.
            assert block.calls == 4, (i, block.calls)


def test_stand_ins_run_once_per_kind_of_call_with_dense_numbers():
    run_ranks(2, _stand_ins_across_steps, timeout=180)


def _tiny_llama():
    """A tiny Llama with transformers' default use_cache=True and non-trivial weights."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape))
    assert model.config.use_cache is True
    return model


def _train_without_cache(piped, dense):
    """Two train_steps of ``piped`` against ``dense``: the dense loss and gradients, no layer given
    a cache during the steps (each layer's calls recorded), ``config.use_cache`` True after them,
    and ``use_cache=True`` passed to train_step reaching the layers."""
    seen = []  # the cache each layer call is given (its keyword by transformers' version)
    for layer in piped.model.layers:
        layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(next(
            (kwargs[key] for key in ("cache", "past_key_values", "past_key_value") if kwargs.get(key) is not None),
            None)), with_kwargs=True)
    ids, target = torch.randint(0, 97, (4, 8)), torch.randint(0, 97, (4, 8))

    def loss_fn(output, target):
        return torch.nn.functional.cross_entropy(output.logits.flatten(0, 1), target.flatten())

    for step in range(2):
        loss = piped.train_step(ids, target=target, loss_fn=loss_fn)
        dense.zero_grad()
        expected = loss_fn(dense(ids), target)
        expected.backward()
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
        for (name, p), (_, q) in zip(piped.named_parameters(), dense.named_parameters()):
            if not p.is_meta:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        piped.zero_grad()
    assert seen and all(cache is None for cache in seen), [type(cache).__name__ for cache in seen]
    assert piped.config.use_cache is True
    seen.clear()
    piped.train_step(ids, target=target, loss_fn=loss_fn, use_cache=True)  # the caller's choice, as given
    assert seen and all(cache is not None for cache in seen)


def _llama_without_cache(rank, world):
    dense = _tiny_llama()
    _train_without_cache(torch_mp.pipeline(copy.deepcopy(dense), chunks=2, timeout=120), dense)


def test_train_step_runs_transformers_models_without_cache():
    """transformers' use_cache=True made every rank's stand-ins replay the other ranks' layers on
    meta to fill a cache (seconds per micro-batch): train_step turns it off for the step."""
    run_ranks(2, _llama_without_cache, timeout=240)
    _train_without_cache(torch_mp.split(copy.deepcopy(_tiny_llama()), ["cpu", "cpu"], chunks=2), _tiny_llama())
