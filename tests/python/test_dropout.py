"""Dropout under tensor parallelism draws the dense model's masks (torch_mp._tensor_parallel.dropout).

Every rank is seeded alike (distributed.py), as the dense model has one generator: a sharded model
with dropout on then gives the dense model's outputs, gradients and steps, the sharded activations
(attention probabilities by heads, sequence-parallel activations) cut from the dense mask and the
replicated ones dropped alike on every rank.
"""
import copy

import pytest
import torch
import torch.distributed as dist

import torch_mp
from distributed import run_ranks

transformers = pytest.importorskip("transformers")

RTOL, ATOL = 1e-4, 1e-5  # whole models, as test_tensor_parallel_wrapper.py


def gpt2(attn_implementation="sdpa", attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1):
    config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     attn_pdrop=attn_pdrop, resid_pdrop=resid_pdrop, embd_pdrop=embd_pdrop,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attn_implementation
    return transformers.GPT2LMHeadModel(config)


def llama(attn_implementation="sdpa"):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32,
                                      attention_dropout=0.1, use_cache=False, bos_token_id=0, eos_token_id=0,
                                      pad_token_id=0)
    config._attn_implementation = attn_implementation
    return transformers.LlamaForCausalLM(config)


def t5(attn_implementation="eager"):
    # Dropout between the MLP's wi and wo, on features sharded by the column-parallel wi.
    config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.1, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


def bart(attn_implementation="sdpa"):
    # activation_dropout between fc1 and fc2, children of the layer itself; dropout after fc2 (replicated).
    config = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.1,
                                     attention_dropout=0.1, activation_dropout=0.1)
    config._attn_implementation = attn_implementation
    return transformers.BartForConditionalGeneration(config)


class Encoder(torch.nn.Module):
    """nn.TransformerEncoder (nn.MultiheadAttention, dropout 0.1 everywhere) between an embedding and a head."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(128, 32)
        layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.1,
                                                 batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(32, 128)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)))


def encoder(attn_implementation=None):
    return Encoder()


def loss_of(model, ids):
    if isinstance(model, Encoder):
        return torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    return model(ids, labels=ids).loss


def gathered(t, world):
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return parts


def dropped_alike(a, b, valid):
    """The share of valid positions that two heads both drop or both keep."""
    return ((a == 0) == (b == 0))[valid].float().mean().item()


def check_heads_drop_their_own_positions(rank, world):
    """GPT-2 with attn_pdrop=0.5: rank 1's head 0 is the dense model's head 2 and drops its positions,
    not rank 0's head 0's (before the fix: 100% alike)."""
    torch.manual_seed(0)
    dense = gpt2("eager", attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0).train()
    sharded = torch_mp.tensor_parallel(copy.deepcopy(dense))
    ids = torch.randint(0, 128, (2, 16))
    torch.manual_seed(1)
    expected = dense(ids, output_attentions=True).attentions[0]  # [batch, 4 heads, query, key]
    torch.manual_seed(1)
    actual = sharded(ids, output_attentions=True).attentions[0]  # [batch, 2 heads of this rank, ...]
    heads = expected.shape[1] // world
    mine = expected[:, rank * heads:(rank + 1) * heads]
    assert torch.equal(actual == 0, mine == 0), "this rank's heads drop other positions than the dense model's"
    torch.testing.assert_close(actual, mine, rtol=RTOL, atol=ATOL)
    valid = torch.ones(16, 16, dtype=torch.bool).tril().expand(2, 16, 16)
    first_heads = gathered(actual[:, 0], world)
    agreement = dropped_alike(first_heads[0], first_heads[1], valid)
    assert agreement == dropped_alike(expected[:, 0], expected[:, heads], valid)
    assert 0.35 < agreement < 0.65, agreement


def test_heads_on_different_ranks_drop_different_positions():
    run_ranks(2, check_heads_drop_their_own_positions)


def assert_dense_steps(dense, sharded, ids, name, steps=3):
    """Several SGD steps with dropout on: the dense losses, and at the end the dense weights."""
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.5) for model in (dense, sharded)]
    for step in range(steps):
        losses = []
        for model, optimizer in zip((dense, sharded), optimizers):
            torch.manual_seed(100 + step)
            loss = loss_of(model, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=RTOL, atol=ATOL, msg=f"{name} step {step} loss")
    reference = dense.state_dict()
    state = torch_mp.full_state_dict(sharded)
    for key in reference:
        torch.testing.assert_close(state[key], reference[key], rtol=RTOL, atol=ATOL, msg=f"{name} {key}")


def check_dense_numbers_with_dropout(rank, world, sequence_parallel):
    cases = [(gpt2, "sdpa"), (gpt2, "eager"), (llama, "sdpa"), (llama, "eager")]
    if not sequence_parallel:  # encoder-decoders: no sequence parallel blocks
        cases += [(t5, "eager"), (bart, "sdpa"), (encoder, None)]
    for make, implementation in cases:
        name = f"{make.__name__} {implementation} sequence_parallel={sequence_parallel}"
        torch.manual_seed(0)
        dense = make(implementation).train()
        sharded = torch_mp.tensor_parallel(copy.deepcopy(dense), sequence_parallel=sequence_parallel)
        ids = torch.randint(0, 128, (2, 8 * world))
        # The masks really drop: two draws differ.
        assert not torch.equal(loss_of(dense, ids), loss_of(dense, ids)), name
        assert_dense_steps(dense, sharded, ids, name)
        # Replicated activations (the embeddings, the blocks' outputs, the logits; under sequence
        # parallelism those whole along the sequence) are the same on every rank.
        if make in (t5, bart, encoder):
            continue
        torch.manual_seed(7)
        output = sharded(ids, output_hidden_states=True)
        replicated = [t for t in (*output.hidden_states, output.logits) if t.shape[1] == ids.shape[1]]
        assert len(replicated) >= (2 if sequence_parallel else len(output.hidden_states) + 1), name
        for t in replicated:
            copies = gathered(t.detach(), world)
            assert all(torch.equal(c, copies[0]) for c in copies), name


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_dropout_gives_the_dense_steps(sequence_parallel):
    run_ranks(2, check_dense_numbers_with_dropout, sequence_parallel, timeout=400)


def steps(model, optimizer, ids, count):
    losses = []
    for _ in range(count):
        loss = loss_of(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def check_recomputation_and_resume(rank, world, folder):
    # Activation checkpointing: the recomputed forward draws the masks its forward drew (the shared
    # stream is restored by torch.utils.checkpoint), so the steps are still the dense model's.
    for use_reentrant in (False, True):
        torch.manual_seed(0)
        dense = gpt2().train()
        sharded = torch_mp.tensor_parallel(copy.deepcopy(dense))
        for model in (dense, sharded):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        assert_dense_steps(dense, sharded, torch.randint(0, 128, (2, 16)), f"checkpointed {use_reentrant=}")

    # Resume: torch_mp.save keeps the shared stream's state, load restores it: the masks after a
    # resume are those of the uninterrupted run.
    torch.manual_seed(0)
    model = torch_mp.tensor_parallel(llama())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 128, (2, 16))
    steps(model, optimizer, ids, 2)
    torch_mp.save(model, f"{folder}/checkpoint", optimizer)
    uninterrupted = steps(model, optimizer, ids, 3)
    torch.manual_seed(123)  # another state: load must restore the saved one
    resumed_model = torch_mp.tensor_parallel(llama())
    resumed_optimizer = torch.optim.AdamW(resumed_model.parameters(), lr=1e-2)
    torch_mp.load(resumed_model, f"{folder}/checkpoint", resumed_optimizer)
    assert torch.equal(steps(resumed_model, resumed_optimizer, ids, 3), uninterrupted)


def test_recomputation_and_resume_draw_the_same_masks(tmp_path):
    run_ranks(2, check_recomputation_and_resume, str(tmp_path), timeout=400)


def test_split_micro_batches_draw_masks_of_their_own():
    """Under split, dropout draws from the one generator of the process. With one micro-batch the
    draws are the dense model's (same order, same shapes): the dense numbers. With several, each
    micro-batch draws its own [batch / chunks, ...] mask, in the order the stage threads reach the
    generator: not the dense model's masks (nor the same from run to run), but masks of their own,
    none repeated across micro-batches or stages, each dropping p of the positions."""
    torch.manual_seed(0)
    dense = gpt2().train()
    ids = torch.randint(0, 128, (4, 16))
    torch.manual_seed(5)
    expected = loss_of(dense, ids)
    torch.manual_seed(5)
    assert torch.equal(loss_of(torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=1), ids), expected)

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 64),
                                torch.nn.Dropout(0.5))
    masks = []
    for layer in (model[1], model[3]):
        layer.register_forward_hook(lambda module, args, output: masks.append(output == 0))
    torch_mp.split(model, ["cpu", "cpu"], chunks=2, layers=["0", "1", "2", "3"])(torch.randn(8, 64))
    assert len(masks) == 4 and all(mask.shape == (4, 64) for mask in masks)
    for i, mask in enumerate(masks):
        assert 0.35 < mask.float().mean() < 0.65
        for other in masks[i + 1:]:
            assert 0.35 < (mask == other).float().mean() < 0.65


def check_pipeline_draws_the_dense_masks(rank, world):
    torch.manual_seed(0)
    dense = gpt2().train()
    ids = torch.randint(0, 128, (4, 16))
    piped = torch_mp.pipeline(copy.deepcopy(dense), chunks=1)
    optimizers = [torch.optim.SGD([p for p in model.parameters() if not p.is_meta], lr=0.5) for model in (dense, piped)]
    for step in range(3):
        torch.manual_seed(100 + step)
        expected = loss_of(dense, ids)
        expected.backward()
        torch.manual_seed(100 + step)
        loss = piped.train_step(ids, target=ids, loss_fn=lambda output, labels: torch.nn.functional.cross_entropy(
            output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()))
        torch.testing.assert_close(loss, expected.detach(), rtol=RTOL, atol=ATOL, msg=f"step {step} loss")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    state = torch_mp.full_state_dict(piped)
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=RTOL, atol=ATOL, msg=key)
    # Several micro-batches draw masks of their own: said, not silent.
    with pytest.warns(UserWarning, match="each draws its own masks"):
        torch_mp.pipeline(copy.deepcopy(dense), chunks=2).train_step(
            ids, target=ids, loss_fn=lambda output, labels: output.logits.float().mean())


def test_pipeline_draws_the_dense_models_masks_with_one_micro_batch():
    """GPT-2 with embedding, attention (scaled_dot_product_attention's dropout_p) and residual
    dropout, pipelined on 2 ranks with one micro-batch, every rank seeded alike: each rank draws
    the masks of other ranks' stages too (their dropouts run on zeros of the meta shapes, also
    when a stand-in replays its call), so its own stages draw the dense model's masks: three SGD
    steps give the dense losses and weights (the second rank drew from where the first rank's
    stage had not advanced the generator: 1.117 against the dense 1.210 on a Sequential, no
    error). With two micro-batches train_step warns that each draws its own."""
    run_ranks(2, check_pipeline_draws_the_dense_masks, timeout=400)
