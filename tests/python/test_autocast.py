"""torch.autocast around tensor-parallel models, against the dense model under the same autocast.

The ops declare their autocast behaviour in C++ (csrc/ops/autocast.cpp): the matmuls run in the
autocast dtype as aten::linear does, the collectives in the dtype that arrives. The dense and the
sharded model then run the same bf16 (fp16) matmuls, except that a row-parallel layer's output is a
sum of per-rank partial products, each rounded to the low precision before the all-reduce adds them
(the dense matmul rounds once, after summing in float32). Outputs and gradients therefore agree to a
few roundings of the low-precision dtype relative to the tensor's size, not to fp32 rounding:
``ULPS`` units of the dtype's epsilon times the largest magnitude of the dense tensor.
"""
import copy

import pytest
import torch

import torch_mp
from distributed import run_ranks

transformers = pytest.importorskip("transformers")

ULPS = 4


def gpt2():
    config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32,
                                      use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def assert_close_to_rounding(actual, expected, dtype, msg):
    """|actual - expected| <= ULPS * eps(dtype) * max |expected| (see the module docstring)."""
    tolerance = ULPS * torch.finfo(dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=tolerance, msg=msg)


def full_gradients(model):
    """The gradients of a tensor-parallel model's parameters, gathered to the stock shapes."""
    gradients = copy.deepcopy(model)  # parameters copied without their .grad
    missing = [name for name, param in model.named_parameters() if param.grad is None]
    assert not missing, f"no gradient for {missing}"
    with torch.no_grad():
        for param, holder in zip(model.parameters(), gradients.parameters()):
            holder.copy_(param.grad)
    return torch_mp.full_state_dict(gradients)


def step_under_autocast(model, ids, dtype):
    with torch.autocast("cpu", dtype):
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    return logits, loss


def check_models_under_autocast(rank, world, dtype):
    # async_tp: the row-parallel layers' matmul_reduce_scatter runs under autocast too.
    for make, sequence_parallel, async_tp in ((llama, False, False), (llama, True, False), (llama, True, True),
                                             (gpt2, False, False), (gpt2, True, False)):
        torch.manual_seed(0)
        dense = make().train()
        ids = torch.randint(0, 128, (2, 4 * world))
        sharded = torch_mp.tensor_parallel(copy.deepcopy(dense), sequence_parallel=sequence_parallel,
                                           async_tp=async_tp)
        expected_logits, expected_loss = step_under_autocast(dense, ids, dtype)
        logits, loss = step_under_autocast(sharded, ids, dtype)
        name = f"{make.__name__} sequence_parallel={sequence_parallel} async_tp={async_tp} {dtype}"
        assert logits.dtype == expected_logits.dtype == dtype, name
        assert_close_to_rounding(logits, expected_logits, dtype, f"{name} logits")
        assert_close_to_rounding(loss, expected_loss, dtype, f"{name} loss")
        gradients = full_gradients(sharded)
        for key, param in dense.named_parameters():
            assert gradients[key].dtype == torch.float32, (name, key)
            assert_close_to_rounding(gradients[key], param.grad, dtype, f"{name} gradient of {key}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_parallel_llama_and_gpt2_under_autocast_match_dense(dtype):
    run_ranks(2, check_models_under_autocast, dtype, timeout=400)
