"""Checkpoint reading: the safetensors reader against the safetensors package, and bad sources."""
import pytest
import torch

import torch_mp
from torch_mp._checkpoint.safetensors import SafetensorsFile

safetensors_torch = pytest.importorskip("safetensors.torch")


def test_reader_matches_safetensors(tmp_path):
    tensors = {
        "float": torch.randn(6, 10),
        "bf16": torch.randn(8, 4).to(torch.bfloat16),
        "ints": torch.arange(12, dtype=torch.int64).view(3, 4),
        "vector": torch.randn(9),
        "empty": torch.zeros(0, 3),
    }
    path = str(tmp_path / "t.safetensors")
    safetensors_torch.save_file(tensors, path)
    reader = SafetensorsFile(path)
    assert set(reader.keys()) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(reader.read(name), tensor)
    bounds = [(1, 3), (4, 6)]
    assert torch.equal(reader.read_slices("float", 0, bounds), torch.cat([tensors["float"][1:3], tensors["float"][4:6]]))
    assert torch.equal(reader.read_slices("float", 1, bounds),
                       torch.cat([tensors["float"][:, 1:3], tensors["float"][:, 4:6]], 1))
    assert torch.equal(reader.read_slices("bf16", 1, [(2, 4)]), tensors["bf16"][:, 2:4])
    assert torch.equal(reader.read_slices("vector", 0, [(0, 3), (6, 9)]), tensors["vector"][[0, 1, 2, 6, 7, 8]])


def test_load_full_state_dict_checks_keys_and_shapes(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"missing keys \['0.bias'\], unexpected keys \['0.extra'\]"):
        torch_mp.load_full_state_dict(model, {"0.weight": torch.zeros(3, 4), "0.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(4, 3\) in the source but \(3, 4\) is expected"):
        torch_mp.load_full_state_dict(model, {"0.weight": torch.zeros(4, 3), "0.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="holds no .safetensors files"):
        torch_mp.load_full_state_dict(model, str(tmp_path))
    path = str(tmp_path / "model.pt")
    torch.save({"0.weight": torch.ones(3, 4), "0.bias": torch.ones(3)}, path)
    torch_mp.load_full_state_dict(model, path)
    assert torch.equal(model[0].weight, torch.ones(3, 4))


def test_meta_parameters_need_a_source():
    with torch_mp.init_empty_weights():
        model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"\['0.bias'\] are on the meta device and the source does not hold them"):
        torch_mp.load_full_state_dict(model, {"0.weight": torch.zeros(3, 4)}, strict=False)


@pytest.mark.parametrize("tensor_parallel", [False, True])
def test_a_bf16_checkpoint_into_a_model_built_on_meta_takes_the_models_dtype(tmp_path, tensor_parallel):
    """A model built in fp32 on the meta device, loaded from a bf16 file, holds fp32 parameters with
    the file's values, as ``load_state_dict`` into a built model casts them (the loaded parameters
    took the file's bf16: a Llama trained in bf16 with no error, loss 4.107099 against 4.107081)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config)
    path = str(tmp_path / "bf16.safetensors")
    safetensors_torch.save_file({k: v.bfloat16().contiguous() for k, v in dense.state_dict().items()}, path)
    dense.load_state_dict(safetensors_torch.load_file(path))
    with torch_mp.init_empty_weights():
        model = transformers.LlamaForCausalLM(config)
    if tensor_parallel:
        torch_mp.tensor_parallel(model)  # one rank: the default group of a single process
    torch_mp.load_full_state_dict(model, path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids, labels=ids).loss, dense(input_ids=ids, labels=ids).loss)
