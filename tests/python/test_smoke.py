"""The smoke test CI runs against a CPU-only build of torch: the package builds, loads and works."""
import copy
import os

import torch
from torch.utils.cpp_extension import CUDA_HOME

import torch_mp


def test_build_matches_the_installed_torch():
    # The CUDA side is built against a CUDA build of torch where the CUDA toolkit is found; a CUDA
    # torch without the toolkit builds the CPU side (tests/python/test_build.py).
    toolkit = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    assert torch_mp._C._with_cuda == (torch.version.cuda is not None and toolkit)


def test_to_device_forward_and_backward():
    x = torch.randn(3, 4, requires_grad=True)
    torch_mp.to_device(x, "cpu").mul(2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    torch.library.opcheck(torch.ops.torch_mp.to_device.default, (torch.randn(2, 3), torch.device("cpu"), False))


def test_split_matches_unsplit():
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    split = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"])
    x = torch.randn(5, 8)
    torch.testing.assert_close(split(x), dense(x))
    split(x).sum().backward()
    dense(x).sum().backward()
    for (name, a), (_, b) in zip(split.named_parameters(), dense.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_pipelined_split_train_step_matches_unsplit():
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    piped = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=3, schedule="1f1b")
    x, y = torch.randn(7, 8), torch.randn(7, 4)
    loss = piped.train_step(x, target=y, loss_fn=torch.nn.functional.mse_loss)
    expected = torch.nn.functional.mse_loss(dense(x), y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    for (name, a), (_, b) in zip(piped.named_parameters(), dense.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
