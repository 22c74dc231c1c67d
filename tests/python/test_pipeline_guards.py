"""Pipelines that never mix samples or hang (issue 22, items 4 to 6): outputs whose other dims
follow the micro-batch size, stage boundaries of balance="auto", and inputs cut along another dim
than batch_dim; each against the dense model, or a clear error."""
import copy

import pytest
import torch
from torch import nn

import torch_mp


def clip(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8),
        projection_dim=16)
    return transformers.CLIPModel(config).eval()


@pytest.mark.parametrize("batch", [4, 5])
def test_contrastive_logits_are_an_error(batch):
    """Issue 22, item 4: CLIPModel with chunks=2 returned logits_per_image (4, 2) for a batch of 4,
    each micro-batch comparing only its own images and texts; the dense model's is (4, 4). Micro-
    batches of equal (2, 2) and unequal (3, 2) sizes: a ValueError naming the output."""
    dense = clip()
    ids = torch.randint(3, 64, (batch, 7), generator=torch.Generator().manual_seed(1))
    pixels = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    model = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=2)
    with torch.no_grad():
        assert dense(input_ids=ids, pixel_values=pixels).logits_per_image.shape == (batch, batch)
        with pytest.raises(ValueError, match=r"output 'logits_per_image' has shapes .*dims \[1\] follow the "
                                             r"micro-batch size too.*output_merge=\{'logits_per_image': 'cat'\}"):
            model(input_ids=ids, pixel_values=pixels)
        # Its per-sample outputs, asked for alone, are the dense ones.
        torch.testing.assert_close(model.get_image_features(pixel_values=pixels).pooler_output,
                                   dense.get_image_features(pixel_values=pixels).pooler_output)


class PerToken(nn.Module):
    """One row per sample and one column per position: [B, S], whose S may equal a micro-batch size."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return {"scores": self.layers(x).squeeze(-1), "pooled": self.layers(x).mean(1)}


def test_rows_declared_with_cat():
    """An output [B, S] with S equal to the micro-batch size, where the input has S positions too,
    holds one row per sample (S comes from the input): the dense output, with or without
    output_merge={'scores': 'cat'}; 'cat' for a scalar output is an error."""
    torch.manual_seed(0)
    dense = PerToken()
    x = torch.randn(6, 3, 5)  # micro-batches of 3 samples, 3 positions
    torch.testing.assert_close(torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=2)(x)["scores"],
                               dense(x)["scores"])
    model = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=2, output_merge={"scores": "cat"})
    got, want = model(x), dense(x)
    torch.testing.assert_close(got["scores"], want["scores"])
    torch.testing.assert_close(got["pooled"], want["pooled"])

    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(5, 1), nn.Linear(1, 1))

        def forward(self, x):
            return self.layers(x).mean()

    with pytest.raises(ValueError, match="output_merge says 'cat' for output '', which is a scalar"):
        torch_mp.split(Scalar(), ["cpu", "cpu"], chunks=2, output_merge="cat")(torch.randn(4, 5))


class ReusesFirstBlock(nn.Module):
    """Issue 22, item 5: the head is F.linear(x, emb.weight) in the parent's forward, and blocks[0]
    is applied again after the last block."""

    def __init__(self, vocab=11, dim=8, depth=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(depth))

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        x = self.blocks[0](x)
        return nn.functional.linear(x, self.emb.weight)


def _reuse_loss(logits, target):
    return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


def test_layer_used_twice_split_gives_dense_gradients():
    """In one process the micro-batches' forwards are the model's own: a block used twice gets the
    dense gradients."""
    torch.manual_seed(0)
    dense = ReusesFirstBlock()
    ids, target = torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5))
    model = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=2, schedule="1f1b")
    loss = model.train_step(ids, target=target, loss_fn=_reuse_loss)
    want = _reuse_loss(dense(ids), target)
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    for (name, got), (_, param) in zip(model.named_parameters(), dense.named_parameters()):
        torch.testing.assert_close(got.grad, param.grad, msg=name)


def _reuse_on_ranks(rank, world):
    import time

    torch.manual_seed(0)
    model = torch_mp.pipeline(ReusesFirstBlock(), chunks=2, schedule="1f1b", timeout=30)
    ids, target = torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5))
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"calls module 'blocks.0' \(stage 0\) at call 6 of its placed modules on a "
                                         r"tensor that stage 1 made \(module 'blocks.3'\); it was called at call 2"):
        model.train_step(ids, target=target, loss_fn=_reuse_loss)
    assert time.monotonic() - started < 20  # raised at once, not after the timeout
    assert all(param.grad is None for param in model.parameters())  # no backward ran


def test_layer_used_twice_across_ranks_is_an_error_not_a_hang():
    """Issue 22, item 5: across ranks every rank waited out the timeout, then blamed a dead peer.
    Now every rank raises a ValueError naming the module and its two calls, before any backward."""
    from distributed import run_ranks

    run_ranks(2, _reuse_on_ranks, timeout=180)


def _late_rank(rank, world):
    import time

    torch.manual_seed(0)
    model = torch_mp.pipeline(nn.Sequential(*(nn.Linear(4, 4) for _ in range(4))), chunks=2, timeout=3)
    if rank == 1:
        time.sleep(12)  # past rank 0's timeout, well within the group's (60 s)
    started = time.monotonic()
    try:
        model(torch.randn(6, 4))
    except torch_mp.CollectiveError as error:
        return str(error), time.monotonic() - started
    return None


def test_option_check_waits_at_most_the_pipeline_timeout():
    """Issue 22, item 5: the all-gather that compares the ranks' options waited for the group's
    timeout (60 s here), not the pipeline's timeout=3. Rank 0 now gives up after 3 s; rank 1, late,
    then fails waiting for activations that never come."""
    from distributed import run_ranks_until_death

    results = run_ranks_until_death(2, _late_rank, timeout=180)
    message, waited = results[0]
    assert "got no answer within 3 s while comparing the ranks' options" in message
    assert waited < 10
    assert results[1] is not None  # a CollectiveError, not a hang


@pytest.mark.parametrize("devices", [2, 3])
def test_balance_auto_leaves_no_stage_empty(devices):
    """Issue 22, item 6: parameter-free layers weigh nothing, and balance='auto' gave stage sizes
    [0, 2]; among equally good cuts no stage is left empty."""
    model = nn.Sequential(nn.ReLU(), nn.Tanh(), nn.Sigmoid())
    layers = ["0", "1", "2"][:max(devices, 2)]
    torch_mp.split(model, ["cpu"] * devices, layers=layers)
    stages = torch_mp.state_of(model).stage_of
    assert sorted({stages[name] for name in layers}) == list(range(devices))


def test_balance_auto_needs_a_layer_per_stage():
    """Issue 22, item 6: one layer over two devices, under balance='auto', is a clear error; so is an
    empty nn.Sequential."""
    with pytest.raises(ValueError, match=r"balance='auto' cuts 1 layer\(s\) \['0'\] into 2 stages, which leaves a "
                                         "stage without layers"):
        torch_mp.split(nn.Sequential(nn.Linear(3, 3)), ["cpu", "cpu"], layers=["0"])
    with pytest.raises(ValueError, match="nothing to split"):
        torch_mp.split(nn.Sequential(), ["cpu", "cpu"])


class WeightedSum(nn.Module):
    """x [B, F] and per-sample weights w [K, B] (batch along dim 1), as in the issue's chunk_spec."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))

    def forward(self, x, w):
        return self.layers(x) * w.sum(0, keepdim=True).t()


def test_chunk_spec_cuts_along_another_dim():
    """Checked by more than examples: chunk_spec={'w': 1} cuts w [8, B] along dim 1, not along
    batch_dim (dim 0, which here has the batch size too): the dense output."""
    torch.manual_seed(0)
    dense = WeightedSum()
    x, w = torch.randn(8, 4), torch.randn(8, 8)
    want = dense(x, w)
    model = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=2, layers=["layers.0", "layers.2"],
                           chunk_spec={"w": 1})
    torch.testing.assert_close(model(x, w), want)


class SequenceFirst(nn.Module):
    """nn.Transformer's encoder, sequence first: src [S, B, E] and a key padding mask [B, S]."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, src, src_key_padding_mask):
        return self.encoder(src, src_key_padding_mask=src_key_padding_mask)


def test_chunk_spec_with_sequence_first_inputs():
    """batch_dim=1 for sequence-first inputs, with chunk_spec cutting the [B, S] padding mask along
    dim 0: the dense output, gradients too."""
    torch.manual_seed(0)
    dense = SequenceFirst().eval()
    src = torch.randn(7, 6, 16)
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[0, 5:] = mask[3, 2:] = True
    want = dense(src, mask)
    model = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=3, batch_dim=1,
                           chunk_spec={"src_key_padding_mask": 0})
    got = model(src, mask)
    torch.testing.assert_close(got, want)
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), dense.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
