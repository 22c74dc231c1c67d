"""Each pipeline rank holds only its share of the parameters: the embedding on the first stage's
rank, the final norm and head on the last's, a weight tied across the ends (GPT-2's head) on those
two ranks with its gradient summed between just them; the dense model's numbers all along (loss,
every gradient, AdamW steps, the clipped norm, the full state dict)."""
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks

transformers = pytest.importorskip("transformers")


def _non_trivial(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def llama(layers: int) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False, attn_implementation="eager")
    return _non_trivial(transformers.LlamaForCausalLM(config))


def gpt2(layers: int) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=16, n_head=4, vocab_size=97, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    model = _non_trivial(transformers.GPT2LMHeadModel(config))
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def _logits_loss(output, target):
    return F.cross_entropy(output.logits.flatten(0, 1), target.flatten())


def _expected_holders(piped) -> dict:
    """{parameter name: the ranks whose stages run its module}: the embedding with the first
    stage, the final norm and head with the last (the stage each was cut with)."""
    state = torch_mp.state_of(piped)
    holders: dict = {}
    for name, stage in state.stage_of.items():
        for param in piped.get_submodule(name).parameters():
            holders.setdefault(id(param), set()).add(state.pipe.rank_of(stage))
    return {name: holders[id(param)] for name, param in piped.named_parameters()}


def _check(rank, world, make, schedule):
    model = make(8)
    piped = torch_mp.pipeline(copy.deepcopy(model), chunks=4, schedule=schedule, timeout=120)
    pipe = torch_mp.state_of(piped).pipe
    first, last = pipe.rank_of(0), pipe.rank_of(pipe.num_stages - 1)
    ids, target = torch.randint(0, 97, (4, 8)), torch.randint(0, 97, (4, 8))
    dense_opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    piped_opt = torch.optim.AdamW(piped.parameters(), lr=1e-3, weight_decay=0.1)
    for step in range(2):  # the first call places the tensors outside the layers; the second runs so
        loss = piped.train_step(ids, target=target, loss_fn=_logits_loss)
        dense = _logits_loss(model(ids), target)
        dense.backward()
        torch.testing.assert_close(loss, dense.detach(), rtol=1e-5, atol=1e-6, msg=f"step {step}")
        # Each rank's gradients are the dense ones; every parameter is held by some rank.
        for (name, p), (_, q) in zip(piped.named_parameters(), model.named_parameters()):
            if not p.is_meta:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m, step=step, name=name: f"step {step}: {name}: {m}")
        # The clipped norm counts each parameter once (the tied one held on two ranks too).
        norm = torch_mp.clip_grad_norm_(piped, 0.5)
        dense_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        torch.testing.assert_close(norm, dense_norm, rtol=1e-5, atol=1e-6, msg=f"step {step}: norm")
        for opt in (piped_opt, dense_opt):
            opt.step()
            opt.zero_grad()

    # What each rank holds: the ends only with their stages.
    holders = _expected_holders(piped)
    held = {name for name, p in piped.named_parameters() if not p.is_meta}
    assert held == {name for name, ranks in holders.items() if rank in ranks}
    embedding = "transformer.wte.weight" if make is gpt2 else "model.embed_tokens.weight"
    assert holders[embedding] == ({first, last} if make is gpt2 else {first})
    head = "transformer.ln_f.weight" if make is gpt2 else "lm_head.weight"
    assert holders[head] == {last}
    # The tied weight sums its gradient between the two ends only (one group of both, or none
    # where ZB-V puts both ends on rank 0).
    ties = [list(ranks) for _, ranks in pipe.ties]
    assert all(len(ranks) < world for ranks in ties) or world == 2 and ties == [[0, 1]]
    share = sum(p.numel() for p in piped.parameters() if not p.is_meta) / sum(p.numel() for p in model.parameters())
    shares = [None] * world
    dist.all_gather_object(shares, share)
    layers = sum(p.numel() for p in model.model.layers.parameters()) if make is llama else \
        sum(p.numel() for p in model.transformer.h.parameters())
    # Together the ranks hold the model once, the tied weight twice (on two ranks).
    total = sum(p.numel() for p in model.parameters())
    tied_twice = model.transformer.wte.weight.numel() if make is gpt2 and first != last else 0
    assert abs(sum(shares) - (total + tied_twice) / total) < 1e-9, shares
    assert layers > 0

    # The full state dict, gathered from the holders, is the dense model's after the steps.
    full = torch_mp.full_state_dict(piped)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{schedule}: {key}: {m}")
    # Parameters per rank in the memory report: what this rank holds.
    report = torch_mp.memory_report(piped)
    held_bytes = sum(p.numel() * p.element_size() for p in piped.parameters() if not p.is_meta)
    assert [row.where for row in report.rows] == [f"rank {r}" for r in range(world)]
    assert report.rows[rank].parameters == held_bytes
    assert [row.parameters / 4 / total for row in report.rows] == pytest.approx(shares)


def _on_ranks(rank, world, model):
    for schedule in ("1f1b", "zbv"):  # ZB-V: the first and the last stage on rank 0
        _check(rank, world, {"llama": llama, "gpt2": gpt2}[model], schedule)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_each_rank_holds_its_share(world, model):
    run_ranks(world, _on_ranks, model, timeout=280)


class UsedBetweenLayers(nn.Module):
    """Parameters outside the layers used by the code between them: the embedding's weight as the
    head (on the last stage's rank), a scale applied to the inputs before the first layer (every
    rank computes it alike), an offset added on the last stage."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.scale = nn.Parameter(torch.randn(8))
        self.offset = nn.Parameter(torch.randn(8))
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, ids):
        x = self.emb(ids) * self.scale.exp()
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return F.linear(x + self.offset, self.emb.weight)


def _used_between_layers(rank, world):
    torch.manual_seed(0)
    model = UsedBetweenLayers()
    piped = torch_mp.pipeline(copy.deepcopy(model), chunks=2, balance=[1, 2, 1], timeout=30)
    ids, target = torch.randint(0, 11, (4, 3)), torch.randint(0, 11, (4, 3))

    def loss_fn(logits, target):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    for _ in range(2):
        loss = piped.train_step(ids, target=target, loss_fn=loss_fn)
        dense = loss_fn(model(ids), target)
        dense.backward()
        torch.testing.assert_close(loss, dense.detach())
        for (name, p), (_, q) in zip(piped.named_parameters(), model.named_parameters()):
            if not p.is_meta and q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, msg=name)
        for m in (piped, model):
            torch.optim.SGD([p for p in m.parameters() if not p.is_meta], lr=0.5).step()
            m.zero_grad()
    held = {name for name, p in piped.named_parameters() if not p.is_meta}
    # The embedding on both ends (its module on the first, the head on the last), not between;
    # the scale on every rank (computed from it alone, before any stage); the offset on the last.
    assert ("emb.weight" in held) == (rank in (0, world - 1))
    assert "scale" in held and ("offset" in held) == (rank == world - 1)
    ties = {ranks: [id(p) for p in params] for params, ranks in torch_mp.state_of(piped).pipe.ties}
    assert ties.get((0, world - 1), []) == ([id(piped.emb.weight)] if rank in (0, world - 1) else [])


def test_parameters_used_between_the_layers_keep_the_dense_numbers():
    run_ranks(3, _used_between_layers, timeout=240)
