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
