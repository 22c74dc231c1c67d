import pytest
import torch
from torch.library import opcheck

import torch_mp

OP = torch.ops.torch_mp.to_device.default


def target_devices():
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda:0"))
    return devices


@pytest.mark.parametrize("device", target_devices(), ids=str)
@pytest.mark.parametrize("make", [
    lambda: torch.randn(3, 4, requires_grad=True),
    lambda: torch.randn(4, 3).t().requires_grad_(),         # non-contiguous
    lambda: torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
    lambda: torch.arange(6).view(2, 3),                       # integer, no grad
    lambda: torch.randn(0, 5, requires_grad=True),            # empty
], ids=["float", "transposed", "float64", "int64", "empty"])
def test_opcheck(make, device):
    opcheck(OP, (make(), device, False))


def test_forward_copies_to_a_fresh_tensor():
    x = torch.randn(5, 3)
    y = torch_mp.to_device(x, "cpu")
    assert torch.equal(x, y)
    assert y.data_ptr() != x.data_ptr()
    assert y.stride() == x.stride() and y.dtype == x.dtype


def test_backward_returns_gradient_to_source():
    x = torch.randn(4, 4, requires_grad=True)
    weight = torch.randn(4, 4)
    (torch_mp.to_device(x, "cpu") @ weight).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(1).expand(4, 4))
    assert x.grad.device == x.device


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch_mp.to_device(t, "cpu") ** 2, (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch_mp.to_device(t, "cpu") ** 2, (x,))


def _model_step(x):
    return torch_mp.to_device(torch.tanh(x) * 3, "cpu").sin().sum(-1)


def test_compile_has_no_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(6, 7, requires_grad=True)
    explanation = torch._dynamo.explain(_model_step)(x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1

    compiled = torch.compile(_model_step, fullgraph=True)
    x_eager = x.detach().clone().requires_grad_()
    out, out_eager = compiled(x), _model_step(x_eager)
    torch.testing.assert_close(out, out_eager)
    out.sum().backward()
    out_eager.sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad)


def test_compile_with_dynamic_shapes():
    torch._dynamo.reset()
    compiled = torch.compile(_model_step, fullgraph=True, dynamic=True)
    for rows in (3, 5, 9):
        x = torch.randn(rows, 4)
        torch.testing.assert_close(compiled(x), _model_step(x))


def test_unavailable_device_is_a_clear_error():
    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ValueError, match=r"device 'cuda:7' is not available: this process sees \d+ cuda device"):
        torch_mp.to_device(torch.randn(2), "cuda:7")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="device = .tpu. is not a device"):
        torch_mp.to_device(torch.randn(2), "tpu")


def test_non_tensor_input_is_a_type_error():
    with pytest.raises(TypeError, match="expected tensor to be a torch.Tensor, got list"):
        torch_mp.to_device([1.0, 2.0], "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("non_blocking", [False, True])
def test_cuda_round_trip(non_blocking):
    x = torch.randn(64, 64, requires_grad=True)
    y = torch_mp.to_device(x, "cuda:0", non_blocking)
    assert y.device == torch.device("cuda:0")
    z = torch_mp.to_device(y * 2, "cpu", non_blocking)
    torch.cuda.synchronize()
    torch.testing.assert_close(z, x.detach() * 2)
    z.sum().backward()
    assert x.grad.device.type == "cpu"
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
