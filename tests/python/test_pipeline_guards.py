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
    """An output [B, S] with S equal to the micro-batch size is ambiguous: an error, and with
    output_merge={'scores': 'cat'} the dense output; 'cat' for a scalar output is an error."""
    torch.manual_seed(0)
    dense = PerToken()
    x = torch.randn(6, 3, 5)  # micro-batches of 3 samples, 3 positions
    with pytest.raises(ValueError, match=r"output 'scores' has shapes \[\[3, 3\], \[3, 3\]\]"):
        torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=2)(x)
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
