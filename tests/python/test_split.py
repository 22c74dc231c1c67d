import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_mp
from models import GPT, mlp


class CountTransfers(TorchDispatchMode):
    """Counts the torch_mp.to_device calls that reach the kernels, forward and backward."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.torch_mp.to_device.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return next(iter(output.values()))
    return output[0]


def assert_split_matches_dense(make_model, make_inputs, devices, rtol=1e-5, atol=1e-6, **split_kwargs):
    """Split and unsplit model from the same weights: same outputs, gradients and optimizer step."""
    torch.manual_seed(0)
    dense = make_model()
    split = torch_mp.split(copy.deepcopy(dense), devices, **split_kwargs)
    args, kwargs = make_inputs()

    def step(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        output = first_tensor(model(*args, **kwargs))
        loss = output.float().pow(2).mean()
        loss.backward()
        grads = {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}
        optimizer.step()
        return output.detach(), grads

    with CountTransfers() as transfers:
        split_output, split_grads = step(split)
    dense_output, dense_grads = step(dense)

    assert transfers.count > 0, "the split model moved no tensor between its stages"
    assert split_output.device == split.output_device
    torch.testing.assert_close(split_output.cpu(), dense_output, rtol=rtol, atol=atol)
    assert split_grads.keys() == dense_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(split_grads[name], dense_grads[name], rtol=rtol, atol=atol, msg=name)
    split_state, dense_state = split.state_dict(), dense.state_dict()
    assert list(split_state) == list(dense_state)
    for name in dense_state:
        torch.testing.assert_close(split_state[name].cpu(), dense_state[name], rtol=rtol, atol=atol, msg=name)
    return split


def test_mlp(devices):
    split = assert_split_matches_dense(lambda: mlp(), lambda: ((torch.randn(8, 16),), {}), devices)
    assert list(split.device_map) == [str(i) for i in range(7)]
    assert [str(d) for d in split.device_map.values()] == sorted(
        [devices[0]] * 3 + [devices[1]] * 4, key=devices.index)


def test_gpt_with_residuals_kwargs_and_tied_head(devices):
    ids = torch.randint(0, 97, (3, 16))
    split = assert_split_matches_dense(lambda: GPT(), lambda: ((ids,), {"targets": ids}), devices)
    blocks = [name for name in split.device_map if name.startswith("blocks.")]
    assert blocks == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert {str(split.device_map[name]) for name in blocks} == set(devices)
    # The head shares its weight with the token embedding, so it runs where that weight lives.
    assert split.device_map["head"] == split.device_map["tok"]
    assert split.head.weight is split.tok.weight


def test_resnet18(devices):
    torchvision = pytest.importorskip("torchvision")
    split = assert_split_matches_dense(
        lambda: torchvision.models.resnet18(num_classes=10),
        lambda: ((torch.randn(2, 3, 64, 64),), {}), devices, rtol=1e-4, atol=1e-5)
    assert [name for name in split.device_map if name.startswith("layer")] == \
        ["layer1", "layer2", "layer3", "layer4"]
    assert str(split.device_map["conv1"]) == devices[0]
    assert str(split.device_map["fc"]) == devices[1]


def test_transformers_gpt2(devices):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=4, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    ids = torch.randint(0, 128, (2, 12))
    split = assert_split_matches_dense(
        lambda: transformers.GPT2LMHeadModel(config), lambda: ((), {"input_ids": ids, "labels": ids}),
        devices, rtol=1e-4, atol=1e-5)
    assert [name for name in split.device_map if ".h." in name] == [f"transformer.h.{i}" for i in range(4)]
    assert split.device_map["lm_head"] == split.device_map["transformer.wte"]


def test_balance_list_and_output_device(devices):
    split = assert_split_matches_dense(lambda: mlp(), lambda: ((torch.randn(4, 16),), {}), devices,
                                       balance=[2, 5], output_device=devices[1])
    assert [str(d) for d in split.device_map.values()] == [devices[0]] * 2 + [devices[1]] * 5
    assert [row.modules for row in torch_mp.memory_report(split).rows] == [2, 5]


def test_explicit_device_map(devices):
    placement = {"tok": devices[0], "pos": devices[0], "blocks.0": devices[0], "blocks.1": devices[1],
                 "blocks.2": devices[1], "blocks.3": devices[1], "ln": devices[1], "head": devices[0]}
    ids = torch.randint(0, 97, (2, 8))
    split = assert_split_matches_dense(lambda: GPT(), lambda: ((ids,), {}), devices, balance=placement)
    assert {name: str(device) for name, device in split.device_map.items()} == placement


def test_explicit_layers(devices):
    ids = torch.randint(0, 97, (2, 8))
    split = assert_split_matches_dense(lambda: GPT(), lambda: ((ids,), {}), devices,
                                       layers=["blocks.0.attn", "blocks.1", "blocks.2", "blocks.3"])
    assert "blocks.0.attn" in split.device_map


def test_auto_balance_evens_out_bytes():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 256), nn.Linear(256, 64))
    split = torch_mp.split(model, ["cpu", "cpu"])
    # 4160, 4160, 16640, 16448 parameters (4 bytes each): the two small layers and the first large one
    # cannot share a device with the last without exceeding 16640 + 16448, so the cut goes after layer 2.
    assert list(split.device_map) == ["0", "1", "2", "3"]
    assert [row.parameters for row in torch_mp.memory_report(split).rows] == [4 * (4160 + 4160 + 16640), 4 * 16448]
    assert torch_mp._C._balance_by_size([4160, 4160, 16640, 16448], [2**63 - 1] * 2) == [3, 1]


def test_auto_balance_breaks_ties_by_layer_count():
    """Equal bytes, unequal compute: a Llama whose embedding and head each weigh about four layers
    was cut [1, 1, 5, 1] over 4 devices (the largest load is the head's stage whatever the middle
    does); among the cuts of that least largest load, the fewest layers on the busiest device win."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=8,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attn_implementation="eager", use_cache=False)
    ids = torch.randint(0, 600, (2, 8))
    split = assert_split_matches_dense(lambda: transformers.LlamaForCausalLM(config), lambda: ((ids,), {}),
                                       ["cpu"] * 4)
    layers = [torch_mp.state_of(split).stage_of[f"model.layers.{i}"] for i in range(8)]
    assert [layers.count(stage) for stage in range(4)] == [1, 3, 3, 1]
    assert torch_mp._C._balance_by_size([19, 3, 3, 3, 3, 3, 3, 19], [2**63 - 1] * 4) == [1, 3, 3, 1]


def test_max_memory_shifts_layers(devices):
    model = mlp((16, 64, 64, 64, 64))  # Linear layers of 4352, 16640, 16640, 16640 bytes
    split = torch_mp.split(model, devices, max_memory=[4352 + 16640, "1MB"])
    assert [str(split.device_map[name]) for name in ("0", "2", "4", "6")] == \
        [devices[0], devices[0], devices[1], devices[1]]
    assert torch_mp.memory_report(split).rows[0].parameters == 4352 + 16640


def test_memory_report_per_stage(tmp_path):
    model = torch_mp.split(GPT(), ["cpu", "cpu"], balance=[1, 3])
    report = torch_mp.memory_report(model, png=str(tmp_path / "split.png"))
    assert [row.where for row in report.rows] == ["stage 0 (cpu)", "stage 1 (cpu)"]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(row.parameters for row in report.rows) == total
    assert report.rows[0].parameters > report.rows[1].parameters / 3  # the embeddings sit on stage 0
    assert "stage 1 (cpu)" in str(report)
    assert (tmp_path / "split.png").read_bytes()[:4] == b"\x89PNG"


def test_memory_chart_draws_the_limits_and_legends_only_what_has_bars(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib import pyplot

    limit = 40_000
    model = torch_mp.split(mlp((16, 64, 64, 64, 64)), ["cpu", "cpu"], max_memory=[limit, limit])  # no buffers
    report = torch_mp.memory_report(model)
    figure = report._figure(pyplot, [limit, limit])
    axes = figure.axes[0]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["limit (max_memory)", "parameters"]
    marks = [line.get_xdata()[0] for line in axes.get_lines()]
    assert marks == pytest.approx([limit / 2**20] * 2)  # one red mark per stage, at its limit in MiB
    pyplot.close(figure)
    report.save_png(str(tmp_path / "limits.png"), limits=[limit, limit])
    assert (tmp_path / "limits.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"limits has 1 entries; expected one per row \(2"):
        report.save_png(str(tmp_path / "bad.png"), limits=[limit])


def test_resplitting_replaces_the_hooks():
    model = mlp()
    torch_mp.split(model, ["cpu", "cpu"])
    torch_mp.split(model, ["cpu", "cpu"], balance=[1, 6])
    with CountTransfers() as transfers:
        model(torch.randn(2, 16))
    assert transfers.count == 8  # one per placed module and one for the output: the first hooks are gone


# --- bad input -------------------------------------------------------------------------------

def test_unknown_device():
    with pytest.raises(ValueError, match=r"devices\[1\] = 'tpu:0' is not a device"):
        torch_mp.split(mlp(), ["cpu", "tpu:0"])


def test_unavailable_device():
    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ValueError, match=r"split\(devices\[1\]\): device 'cuda:7' is not available"):
        torch_mp.split(mlp(), ["cpu", "cuda:7"])


def test_balance_that_does_not_add_up():
    with pytest.raises(ValueError, match=r"balance \[1, 1\] adds up to 2 layers but the model has 7 layers"):
        torch_mp.split(mlp(), ["cpu", "cpu"], balance=[1, 1])
    with pytest.raises(ValueError, match=r"has 3 entries but there are 2 devices"):
        torch_mp.split(mlp(), ["cpu", "cpu"], balance=[1, 1, 5])
    with pytest.raises(ValueError, match="expected 'auto'"):
        torch_mp.split(mlp(), ["cpu", "cpu"], balance="even")


def test_max_memory_too_small():
    with pytest.raises(ValueError, match=r"max_memory \[1000, 1000\] \(bytes per device\) cannot hold the model"):
        torch_mp.split(mlp(), ["cpu", "cpu"], max_memory=[1000, 1000])
    with pytest.raises(ValueError, match="is not a size"):
        torch_mp.split(mlp(), ["cpu", "cpu"], max_memory=["lots", "1GB"])


def test_nothing_to_split():
    with pytest.raises(ValueError, match="Linear has nothing to split"):
        torch_mp.split(nn.Linear(4, 4), ["cpu", "cpu"])
    with pytest.raises(ValueError, match="layers is empty"):
        torch_mp.split(mlp(), ["cpu", "cpu"], layers=[])
    with pytest.raises(ValueError, match="'blocks.9', which is not a submodule of GPT"):
        torch_mp.split(GPT(), ["cpu", "cpu"], layers=["blocks.0", "blocks.9"])


def test_explicit_map_must_cover_every_parameter():
    with pytest.raises(ValueError, match=r"unplaced: \['ln'\]"):
        torch_mp.split(GPT(depth=1), ["cpu"], balance={"tok": "cpu", "pos": "cpu", "blocks": "cpu", "head": "cpu"})


def test_bad_argument_types():
    with pytest.raises(TypeError, match="expected module to be a torch.nn.Module"):
        torch_mp.split("model", ["cpu"])
    with pytest.raises(TypeError, match="expected devices to be a list of devices"):
        torch_mp.split(mlp(), "cpu")
    with pytest.raises(ValueError, match="devices is empty"):
        torch_mp.split(mlp(), [])
