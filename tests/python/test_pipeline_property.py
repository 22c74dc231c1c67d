"""Property test: random small models (skip connections, tuples between layers, dict and tuple
outputs, keyword arguments and Python flags, tied weights, dropout, batch norm) under random
pipelined splits (stages, chunks, schedule, checkpointing, batch size) give the dense model's
outputs and gradients."""
import copy

import pytest
import torch
from torch import nn

import torch_mp

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

WIDTH = 6
KINDS = ("mlp", "residual", "pair", "batch_norm", "dropout")


class Block(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.linear = kind, nn.Linear(WIDTH, WIDTH)
        self.extra = nn.BatchNorm1d(WIDTH) if kind == "batch_norm" else nn.Dropout(0.3) if kind == "dropout" else None

    def forward(self, x, scale: float = 1.0):
        if isinstance(x, tuple):  # a tuple from the layer before
            x = x[0] * x[1]
        y = torch.tanh(self.linear(x)) * scale
        if self.kind == "residual":
            return x + y
        if self.kind == "pair":
            return y, x
        if self.extra is not None:
            return self.extra(y)
        return y


class RandomModel(nn.Module):
    def __init__(self, kinds, tied: bool, dict_output: bool):
        super().__init__()
        self.blocks = nn.ModuleList(Block(kind) for kind in kinds)
        self.head = nn.Linear(WIDTH, WIDTH, bias=False)
        if tied:
            self.head.weight = self.blocks[0].linear.weight
        self.dict_output = dict_output

    def forward(self, x, scale: float = 1.0, skip_first: bool = False, **options):
        first = x
        for i, block in enumerate(self.blocks):
            if not (skip_first and i == 0):
                x = block(x, scale=scale)
        if isinstance(x, tuple):
            x = x[0] + x[1]
        logits = self.head(x + first) if options.get("long_skip") else self.head(x)
        if self.dict_output:
            return {"logits": logits, "extras": [x, x.mean()]}
        return logits, x


def _flatten(output):
    if isinstance(output, dict):
        return [output["logits"], output["extras"][0], output["extras"][1]]
    return list(output)


@settings(max_examples=15, deadline=None)
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=2, max_size=5), tied=st.booleans(),
       dict_output=st.booleans(), stages=st.integers(2, 3), chunks=st.integers(1, 5),
       schedule=st.sampled_from(["gpipe", "1f1b"]), checkpoint=st.sampled_from(["never", "except_last", "always"]),
       batch=st.integers(1, 7), scale=st.sampled_from([1.0, 0.5]), skip_first=st.booleans(),
       long_skip=st.booleans(), seed=st.integers(0, 2**16))
def test_random_models_match_the_dense_model(kinds, tied, dict_output, stages, chunks, schedule, checkpoint, batch,
                                             scale, skip_first, long_skip, seed):
    stages = min(stages, len(kinds))
    torch.manual_seed(seed)
    model = RandomModel(kinds, tied, dict_output)
    for module in model.modules():  # dropout and batch norm as at inference: a micro-batch's rows alone
        if isinstance(module, (nn.Dropout, nn.BatchNorm1d)):
            module.eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
    piped = torch_mp.split(copy.deepcopy(model), ["cpu"] * stages, chunks=chunks, schedule=schedule,
                           checkpoint=checkpoint, output_merge={"extras.1": "mean"})
    x = torch.randn(batch, WIDTH)
    flags = dict(scale=scale, skip_first=skip_first, long_skip=long_skip)
    for got, want in zip(_flatten(piped(x, **flags)), _flatten(model(x, **flags))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    def loss_fn(output, _target):
        return sum(t.square().mean() for t in _flatten(output) if t.dim() > 0)  # means over samples

    loss = piped.train_step(x, loss_fn=loss_fn, **flags)
    expected = loss_fn(model(x, **flags), None)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(piped.named_parameters(), model.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
