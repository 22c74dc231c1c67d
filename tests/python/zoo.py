"""The model zoo: tiny configs of the architectures people train, with random non-trivial weights,
and a batch for each. Shared by test_zoo.py and zoo_table.py."""
import math

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, SEQ = 128, 8


def _transformers():
    import transformers

    return transformers


def _causal(cls_name, config_name, **kwargs):
    def make():
        t = _transformers()
        config = getattr(t, config_name)(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                                         **kwargs)
        return getattr(t, cls_name)(config)
    return make


_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)

BUILDERS = {
    "gpt2": _causal("GPT2LMHeadModel", "GPT2Config", n_positions=64, n_embd=32, n_layer=2, n_head=4,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": _causal("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
                        attention_dropout=0.0, hidden_dropout=0.0),
    "gptj": _causal("GPTJForCausalLM", "GPTJConfig", n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "opt": _causal("OPTForCausalLM", "OPTConfig", hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
                   attention_dropout=0.0),
    "llama": _causal("LlamaForCausalLM", "LlamaConfig", **_LLAMA_LIKE),
    "mistral": _causal("MistralForCausalLM", "MistralConfig", sliding_window=4, **_LLAMA_LIKE),
    "mixtral": _causal("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                       **_LLAMA_LIKE),
    "qwen2": _causal("Qwen2ForCausalLM", "Qwen2Config", **_LLAMA_LIKE),
    "qwen3": _causal("Qwen3ForCausalLM", "Qwen3Config", head_dim=8, **_LLAMA_LIKE),
    "gemma2": _causal("Gemma2ForCausalLM", "Gemma2Config", head_dim=8, sliding_window=4, **_LLAMA_LIKE),
    "phi3": _causal("Phi3ForCausalLM", "Phi3Config", **_LLAMA_LIKE),
    # Falcon's three attention layouts: q, k, v interleaved per head; one KV head (multi-query); KV groups.
    "falcon": _causal("FalconForCausalLM", "FalconConfig", hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, new_decoder_architecture=False, multi_query=False, alibi=False,
                      parallel_attn=True, bias=True, attention_dropout=0.0, hidden_dropout=0.0),
    "falcon_mqa": _causal("FalconForCausalLM", "FalconConfig", hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, new_decoder_architecture=False, multi_query=True, alibi=False,
                          attention_dropout=0.0, hidden_dropout=0.0),
    "falcon_gqa": _causal("FalconForCausalLM", "FalconConfig", hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True, alibi=False,
                          attention_dropout=0.0, hidden_dropout=0.0),
}

CAUSAL_LMS = set(BUILDERS)


def _encoder(cls_name, config_name, **kwargs):
    def make():
        t = _transformers()
        return getattr(t, cls_name)(getattr(t, config_name)(vocab_size=VOCAB, **kwargs))
    return make


_BERT_LIKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

BUILDERS.update({
    "bert": _encoder("BertForMaskedLM", "BertConfig", **_BERT_LIKE),
    "roberta": _encoder("RobertaForMaskedLM", "RobertaConfig", pad_token_id=1, **_BERT_LIKE),
    "distilbert": _encoder("DistilBertForMaskedLM", "DistilBertConfig", dim=32, n_layers=2, n_heads=4,
                           hidden_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0),
    "t5": _encoder("T5ForConditionalGeneration", "T5Config", d_model=32, d_kv=8, d_ff=64, num_layers=2,
                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0),
    "bart": _encoder("BartForConditionalGeneration", "BartConfig", d_model=32, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
})


def vit():
    t = _transformers()
    return t.ViTForImageClassification(t.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def tv_vit_b_16():
    """torchvision's vit_b_16 architecture (its class), tiny."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                             num_classes=10)


def tv_convnext():
    """torchvision's convnext_tiny architecture (its class), tiny."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], stochastic_depth_prob=0.0,
                    num_classes=10)


class Seq2Seq(nn.Module):
    """nn.Transformer between an embedding and a head: an encoder stack and a decoder stack."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.transformer = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                          dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.head(self.transformer(x, x, tgt_mask=mask, tgt_is_causal=True))


class NanoAttention(nn.Module):
    """nanoGPT's attention: the fused projection cut with the full width, the output viewed as the input."""

    def __init__(self, dim, heads):
        super().__init__()
        self.n_embd, self.n_head = dim, heads
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), NanoAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, dim=32, heads=4, depth=2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, dim), nn.Embedding(64, dim)
        self.h = nn.ModuleList(NanoBlock(dim, heads) for _ in range(depth))
        self.ln_f, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, VOCAB, bias=False)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


BUILDERS.update({"vit": vit, "tv_vit_b_16": tv_vit_b_16, "tv_convnext": tv_convnext, "nn_transformer": Seq2Seq,
                 "nanogpt": NanoGPT})
IMAGE_MODELS = {"vit": 16, "tv_vit_b_16": 16, "tv_convnext": 32}


def build(name, seed=0):
    """The model, in train mode, with random non-trivial weights: every floating parameter redrawn
    (norm weights and biases too, which initializations set to 1 and 0)."""
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 1.0 / math.sqrt(max(parameter.shape[-1], 1)))
            if parameter.dim() == 1:
                parameter.add_(1.0)
    return model.train()


def batch(name, batch_size=2, seed=1):
    """Keyword inputs for the model's forward."""
    generator = torch.Generator().manual_seed(seed)
    if name in IMAGE_MODELS:
        size = IMAGE_MODELS[name]
        pixels = torch.randn(batch_size, 3, size, size, generator=generator)
        return {"pixel_values": pixels} if name == "vit" else {"x": pixels}
    ids = torch.randint(2, VOCAB, (batch_size, SEQ), generator=generator)
    if name in ("nn_transformer", "nanogpt"):
        return {"ids": ids}
    if name in ("t5", "bart"):
        return {"input_ids": ids, "decoder_input_ids": ids.roll(1, 1)}
    return {"input_ids": ids}


def output_of(model, inputs):
    """The model's main output tensor (logits)."""
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# --- checks against the dense model (shared by test_zoo.py and zoo_table.py) ---------------------

# atol 1e-5, not 1e-6: a rowwise layer's all-reduce adds the ranks' partial products in another order
# than the dense matmul; through two blocks of random weights (norm scales near 1, Gemma's sqrt(hidden)
# embedding scale) fp32 logits of magnitude ~10 differ by a few 1e-6 (measured: at most 2.3e-6).
RTOL, ATOL = 1e-5, 1e-5
# Outcomes other than parity that the zoo expects: a named refusal before any collective.
REFUSALS = {("falcon_gqa", 4): "num_kv_heads=2, not divisible by the group size 4"}
GENERATE_TOKENS = 4


def close(actual, expected, msg):
    import torch

    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda detail: f"{msg}: {detail}")


def _with_padding(name, inputs):
    """Causal LMs see a padding token too (its embedding row must get no gradient)."""
    if name in CAUSAL_LMS:
        inputs["input_ids"][0, -2:] = 0
    return inputs


def _step(model, inputs):
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    output_of(model, inputs).square().mean().backward()
    optimizer.step()


def check_split(name):
    """split on two CPU stages (chunks=1): the same output, the same step. Returns "parity"."""
    import copy

    import torch_mp

    dense = build(name)
    inputs = _with_padding(name, batch(name))
    split = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=1)
    close(output_of(split, inputs), output_of(dense, inputs), f"{name} split forward")
    _step(dense, inputs)
    _step(split, inputs)
    close(output_of(split, inputs), output_of(dense, inputs), f"{name} split after a step")
    return "parity"


def check_tensor_parallel(name, rank, world):
    """tensor_parallel(plan="auto") on this rank against the dense model: forward, one SGD step,
    full_state_dict loaded strictly by the dense model, and generate() for causal LMs. Returns the
    table's cells: (outcome, share of the parameters this rank holds)."""
    import copy

    import torch

    import torch_mp

    dense = build(name)
    inputs = _with_padding(name, batch(name))
    try:
        sharded = torch_mp.tensor_parallel(copy.deepcopy(dense))
    except ValueError as error:
        expected = REFUSALS.get((name, world))
        if expected is None or expected not in str(error):
            raise
        return f"refused: {expected.split(',')[0]}", None
    assert (name, world) not in REFUSALS, f"{name} was expected to be refused"
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in sharded.parameters())
    share = local / sum(p.numel() for p in dense.parameters())
    close(output_of(sharded, inputs), output_of(dense, inputs), f"{name} forward")
    _step(dense, inputs)
    _step(sharded, inputs)
    close(output_of(sharded, inputs), output_of(dense, inputs), f"{name} after one step")
    full = torch_mp.full_state_dict(sharded)
    reference = dense.state_dict()
    assert list(full) == list(reference), f"{name}: full_state_dict keys differ"
    for key, value in reference.items():
        close(full[key], value, f"{name} full_state_dict {key}")
    fresh = BUILDERS[name]()
    fresh.load_state_dict(full, strict=True)
    if name in CAUSAL_LMS:
        for model in (dense, sharded):
            model.eval()
        prompt = inputs["input_ids"][:, :4]
        kwargs = dict(max_new_tokens=GENERATE_TOKENS, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            expected, actual = dense.generate(prompt, **kwargs), sharded.generate(prompt, **kwargs)
        assert torch.equal(actual, expected), f"{name} generate: {actual.tolist()} != {expected.tolist()}"
    return "parity", share
