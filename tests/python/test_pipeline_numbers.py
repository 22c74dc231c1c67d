"""Inputs that gave wrong numbers in a pipeline, each against the value the dense model gives:
in one process (split, devices ["cpu", "cpu"]) and across Gloo ranks (pipeline)."""
import copy
import dataclasses
import threading
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks
from models import GPT


def split2(model, **options):
    return torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], **options)


def assert_grads_match(piped, dense):
    checked = 0
    for (name, p), (_, q) in zip(piped.named_parameters(), dense.named_parameters()):
        if p.is_meta:
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
        checked += 1
    assert checked > 0


# --- 1. outputs of any type --------------------------------------------------------------------

@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    parts: dict
    notes: list
    name: str = "out"


class Structured(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        logits = self.head(x)
        return Output(logits, {"x": x, "pair": (x[:, :2], [logits.sum(-1)])}, [x.mean(), {"y": x * 2}])


def test_dataclass_and_nested_outputs_merge_over_micro_batches():
    torch.manual_seed(0)
    model = Structured()
    x = torch.randn(8, 6)
    piped = split2(model, chunks=2, output_merge={"notes.0": "mean"})
    out, expected = piped(x), model(x)
    assert isinstance(out, Output) and out.logits.shape == (8, 5) and out.name == "out"
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.parts["x"], expected.parts["x"])
    torch.testing.assert_close(out.parts["pair"][0], expected.parts["pair"][0])
    torch.testing.assert_close(out.parts["pair"][1][0], expected.parts["pair"][1][0])
    torch.testing.assert_close(out.notes[0], expected.notes[0])
    torch.testing.assert_close(out.notes[1]["y"], expected.notes[1]["y"])
    x7 = torch.randn(7, 6)  # uneven micro-batches
    torch.testing.assert_close(piped(x7).logits, model(x7).logits)


def test_outputs_that_cannot_merge_are_an_error():
    class WithObject(Structured):
        def forward(self, x):
            return super().forward(x).logits, object()

    with pytest.raises(TypeError, match="cannot be merged into the batch's"):
        split2(WithObject(), chunks=2)(torch.randn(4, 6))


# --- 2. inputs that are not batched ----------------------------------------------------------

class Biased(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x, bias):  # x [B, S, 8], bias [S, S] shared by every sample
        for layer in self.layers:
            x = torch.softmax(bias + x @ x.transpose(1, 2), -1) @ layer(x)
        return x


def test_chunk_spec_says_what_is_batched_and_ambiguity_is_an_error():
    torch.manual_seed(0)
    model = Biased()
    x, bias = torch.randn(4, 4, 8), torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"cannot tell whether input bias \[4, 4\] is batched: dims \[0, 1\] all have "
                                         r"the batch size 4 \(from x \[4, 4, 8\]\); pass chunk_spec=\{'bias': None\}"):
        split2(model, chunks=4)(x, bias)
    piped = split2(model, chunks=4, chunk_spec={"bias": None})
    torch.testing.assert_close(piped(x, bias), model(x, bias))
    # A bias whose size differs from the batch is passed whole without a spec; a batched one is cut.
    torch.testing.assert_close(split2(model, chunks=3)(x[:3], bias), model(x[:3], bias))
    batched = torch.randn(4, 4, 4)
    torch.testing.assert_close(split2(model, chunks=4, chunk_spec={"bias": 0})(x, batched), model(x, batched))
    with pytest.raises(ValueError, match=r"chunk_spec names \['mask'\], which are not inputs"):
        split2(model, chunks=2, chunk_spec={"mask": None})(x, bias)


# --- 3. loss over tokens ---------------------------------------------------------------------

def _lm_case():
    torch.manual_seed(0)
    model = GPT(depth=2)
    ids = torch.randint(0, 97, (2, 16))
    labels = ids.clone()
    labels[0, 4:] = -100  # micro-batch 0 holds 4 real tokens, micro-batch 1 holds 16
    return model, ids, labels


def _summed(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def _real_tokens(labels):
    return (labels != -100).sum()


def test_token_normalized_loss_equals_the_whole_batch_mean():
    model, ids, labels = _lm_case()
    expected = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
    expected.backward()
    for schedule in ("gpipe", "1f1b"):
        piped = split2(model, chunks=2, schedule=schedule)
        loss = piped.train_step(ids, target=labels, loss_fn=_summed, normalizer=_real_tokens)
        torch.testing.assert_close(loss, expected.detach())
        assert_grads_match(piped, model)
    piped = split2(model, chunks=2)
    loss = piped.train_step(ids, target=labels, loss_fn=_summed, normalizer=20)
    torch.testing.assert_close(loss, expected.detach())
    with pytest.raises(ValueError, match="the normalizer is 0; expected a positive count"):
        piped.train_step(ids, target=labels, loss_fn=_summed, normalizer=0)


# --- 4. in-place updates of dict and list arguments --------------------------------------------

class Cached(nn.Module):
    """Attention-free 'cache': each layer stores its input in ``cache`` and adds what it stored
    before; auxiliary losses go into ``aux``."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(CacheLayer(i) for i in range(4))

    def forward(self, x, cache: dict, aux: list):
        for layer in self.layers:
            x = layer(x, cache, aux)
        return x


class CacheLayer(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.index, self.linear = index, nn.Linear(4, 4)

    def forward(self, x, cache, aux):
        past = cache.get(self.index)
        cache[self.index] = x.detach()
        aux.append(x.square().mean())
        return self.linear(x) + (past if past is not None else 0)


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_in_place_updates_of_the_callers_dict_and_list(chunks):
    torch.manual_seed(0)
    model = Cached()
    piped = split2(model, chunks=chunks, output_merge="mean")  # the auxiliary losses are means
    prompt, step = torch.randn(5, 4), torch.randn(5, 4)
    cache, aux, dense_cache, dense_aux = {}, [], {}, []
    torch.testing.assert_close(piped(prompt, cache, aux), model(prompt, dense_cache, dense_aux))
    assert sorted(cache) == [0, 1, 2, 3] and len(aux) == 4
    for key in cache:
        torch.testing.assert_close(cache[key], dense_cache[key])
    torch.testing.assert_close(torch.stack(aux), torch.stack(dense_aux))
    torch.testing.assert_close(piped(step, cache, aux), model(step, dense_cache, dense_aux))
    assert len(aux) == 8


# --- 5. shapes that change with Python arguments or with data -----------------------------------

class Keep(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))

    def forward(self, x, keep: int = 4, return_all: bool = True):
        x = self.layers[0](x)[:, :keep]  # x [B, S, 6]: the first `keep` positions go on
        x = self.layers[1](x)
        kept = x[..., 0] > -0.5  # unpadding: positions kept by their values, [N, 6] between layers
        rows = self.layers[3](self.layers[2](x[kept]))
        x = x.new_zeros(x.shape).index_put((kept,), rows)
        return x if return_all else x.mean()  # a scalar output merges as a mean over samples


def test_shapes_follow_python_arguments_and_data_in_split():
    torch.manual_seed(0)
    model = Keep()
    piped = split2(model, chunks=2, layers=["layers.0", "layers.1", "layers.2", "layers.3"], output_merge="mean")
    for keep in (4, 2, 5):
        x = torch.randn(4, 6, 6)
        torch.testing.assert_close(piped(x, keep), model(x, keep))
        torch.testing.assert_close(piped(x, keep=keep, return_all=False), model(x, keep=keep, return_all=False))


# --- 7. thread-local state ------------------------------------------------------------------------

def test_thread_local_state_holds_in_every_stage():
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)))
    x = torch.randn(6, 8)
    plain, piped = split2(model), split2(model, chunks=3)
    with torch.autocast("cpu", torch.bfloat16):
        expected, out = plain(x), piped(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with torch.no_grad():
        assert not piped(x).requires_grad
    with torch.inference_mode():
        assert piped(x).is_inference()
    packed = []
    lock = threading.Lock()

    def pack(t):
        with lock:
            packed.append(threading.current_thread().name)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        piped(x).sum().backward()
    assert any(name.startswith("torch_mp-micro-batch") for name in packed)


# --- 8. random numbers under checkpointing --------------------------------------------------------

class ScaledDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(100))
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(x * self.weight)


@pytest.mark.parametrize("checkpoint", ["always", "except_last"])
def test_recomputation_replays_each_stage_and_micro_batch_random_stream(checkpoint):
    """y = x * (product of the masks, scaled); its gradient is y / x only if every recomputed
    forward draws the masks its forward drew."""
    torch.manual_seed(0)
    model = nn.Sequential(*(ScaledDropout() for _ in range(4)))
    piped = split2(model, chunks=10, checkpoint=checkpoint)
    x = (torch.rand(20, 100) + 0.5).requires_grad_()
    y = piped(x)
    y.sum().backward()
    assert 0 < int((y == 0).sum()) < y.numel()
    torch.testing.assert_close(x.grad, y.detach() / x.detach(), rtol=1e-6, atol=0)


# --- 10. small batches ------------------------------------------------------------------------

def test_batches_smaller_than_chunks_and_empty_batches():
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)))
    piped = split2(model, chunks=4)
    x = torch.randn(2, 8)
    torch.testing.assert_close(piped(x), model(x))
    loss = piped.train_step(x, target=torch.zeros(2, 8), loss_fn=F.mse_loss)
    torch.testing.assert_close(loss, F.mse_loss(model(x), torch.zeros(2, 8)))
    empty = torch.randn(0, 8)
    assert piped(empty).shape == (0, 8) == split2(model)(empty).shape


# --- 11. tuples across a stage boundary -----------------------------------------------------------

class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, pair):
        x, y = pair
        return torch.tanh(self.a(x) + y), self.b(y) * x


def test_tuples_crossing_stages_get_gradients_to_both():
    torch.manual_seed(0)
    model = nn.Sequential(*(Pair() for _ in range(4)))
    x, y = torch.randn(5, 6), torch.randn(5, 6)
    piped = split2(model, chunks=2, schedule="1f1b")

    def loss_fn(out, _):
        return out[0].square().mean() + out[1].square().mean()

    loss = piped.train_step((x, y), loss_fn=loss_fn)
    expected = loss_fn(model((x, y)), None)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    assert_grads_match(piped, model)
    assert all(p.grad.abs().sum() > 0 for p in piped.parameters())


# --- 12. balance="time" leaves the model as found ---------------------------------------------------

def test_balance_by_time_leaves_grads_statistics_and_mode_as_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Linear(8, 8))
    model(torch.randn(16, 8)).sum().backward()
    model[2].eval()
    before = copy.deepcopy(model)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    piped = torch_mp.split(model, ["cpu", "cpu"], balance="time", sample=(torch.randn(16, 8) * 3 + 2,),
                           layers=["0", "1", "2", "3"])
    for name, p in piped.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=0, atol=0, msg=name)
    for (name, b), (_, c) in zip(piped.named_buffers(), before.named_buffers()):
        torch.testing.assert_close(b, c, msg=name)
    assert [m.training for m in piped.modules()] == [m.training for m in before.modules()]


# --- 13. failures, eval mode, empty stages ----------------------------------------------------------

class Slow(nn.Module):
    def __init__(self, calls, seconds=0.0, fail=False):
        super().__init__()
        self.linear, self.calls, self.seconds, self.fail = nn.Linear(4, 4), calls, seconds, fail

    def forward(self, x):
        self.calls.append(time.monotonic())
        if self.fail:
            raise RuntimeError("stage 1 failed")
        time.sleep(self.seconds)
        return self.linear(x)


def test_after_a_stage_raises_the_others_stop_at_once():
    first, second = [], []
    model = nn.Sequential(Slow(first, seconds=0.2), Slow(second, fail=True))
    piped = torch_mp.split(model, ["cpu", "cpu"], chunks=6)
    with pytest.raises(RuntimeError, match="stage 1 failed"):
        piped(torch.randn(6, 4))
    # Micro-batch 0 raised in stage 1 while micro-batch 1 ran stage 0; nothing started after.
    assert len(second) == 1 and len(first) <= 2


def test_eval_mode_recomputes_nothing():
    calls = []
    model = nn.Sequential(Slow(calls), Slow([]), Slow([]))
    piped = torch_mp.split(model, ["cpu", "cpu", "cpu"], chunks=3, checkpoint="always").eval()
    piped.train_step(torch.randn(6, 4), target=torch.zeros(6, 4), loss_fn=F.mse_loss)
    assert len(calls) == 3
    piped.train()
    calls.clear()
    piped.train_step(torch.randn(6, 4), target=torch.zeros(6, 4), loss_fn=F.mse_loss)
    assert len(calls) == 6  # each micro-batch's forward, then its recomputation


def test_balance_with_an_empty_stage_is_an_error():
    with pytest.raises(ValueError, match=r"balance \[0, 2\] leaves a stage without layers"):
        torch_mp.split(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), ["cpu", "cpu"], balance=[0, 2])


# --- across ranks ------------------------------------------------------------------------------

class TiedInParent(nn.Module):
    """The head is computed in the parent's forward from the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return F.linear(x, self.emb.weight)


def _on_ranks(rank, world):
    def last(output, expected):  # the last stage's output, on every rank
        torch.testing.assert_close(output, expected)

    # 6. tied parameters used in the parent's forward: gradient, optimizer step, loss after it.
    torch.manual_seed(0)
    model = TiedInParent()
    piped = torch_mp.pipeline(copy.deepcopy(model), chunks=2)
    ids, target = torch.randint(0, 11, (5, 3)), torch.randint(0, 11, (5, 3))

    def loss_fn(logits, target):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    for _ in range(2):
        loss = piped.train_step(ids, target=target, loss_fn=loss_fn)
        expected = loss_fn(model(ids), target)
        expected.backward()
        torch.testing.assert_close(loss, expected.detach())
        assert_grads_match(piped, model)
        for m in (piped, model):
            torch.optim.SGD([p for p in m.parameters() if not p.is_meta], lr=0.5).step()
            m.zero_grad()

    # 5. shapes that change with a Python argument and with the data: headers follow what crosses.
    torch.manual_seed(0)
    model = Keep()
    piped = torch_mp.pipeline(copy.deepcopy(model), chunks=2, layers=[f"layers.{i}" for i in range(4)],
                              output_merge="mean")
    for keep in (4, 2, 5):
        x = torch.randn(4, 6, 6)
        last(piped(x, keep), model(x, keep))
        loss = piped.train_step(x, keep, loss_fn=lambda out, _: out.square().sum(), normalizer=1)
        torch.testing.assert_close(loss, model(x, keep).square().sum().detach())
    x = torch.randn(4, 6, 6)
    last(piped(x, keep=3, return_all=False), model(x, keep=3, return_all=False))

    # 3. token-normalized loss, 10. small and empty batches, 1. nested outputs.
    model, ids, labels = _lm_case()
    piped = torch_mp.pipeline(copy.deepcopy(model), chunks=2)
    loss = piped.train_step(ids, target=labels, loss_fn=_summed, normalizer=_real_tokens)
    expected = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    assert_grads_match(piped, model)
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)))
    piped = torch_mp.pipeline(copy.deepcopy(model), chunks=4)
    x = torch.randn(2, 8)
    last(piped(x), model(x))
    out = piped(torch.randn(0, 8))
    assert out.shape == (0, 8)


def test_pipeline_tied_weights_python_arguments_data_shapes_tokens_and_small_batches():
    run_ranks(2, _on_ranks, timeout=240)
