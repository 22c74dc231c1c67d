import hashlib
import os
import sys
import tempfile

import pytest
import torch

import torch_mp

sys.path.insert(0, os.path.dirname(__file__))


def _inductor_cache_dir() -> str:
    """An inductor cache for this build of libtorch_mp: inductor's cache keys do not cover a custom
    op's schema, so code compiled against an earlier build would be replayed against this one."""
    library = os.path.join(os.path.dirname(torch_mp.__file__), "lib", "libtorch_mp.so")
    with open(library, "rb") as handle:
        build = hashlib.sha256(handle.read()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"torch_mp-inductor-{build}")


# Set before anything compiles; the ranks and torchrun jobs the tests start inherit it.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())


def split_device_lists():
    """Device lists the split tests run on: two CPU stages always, a GPU and the CPU where a GPU exists."""
    lists = [["cpu", "cpu"]]
    if torch.cuda.is_available():
        lists.append(["cuda:0", "cpu"])
    return lists


@pytest.fixture(params=split_device_lists(), ids=lambda devices: "+".join(devices))
def devices(request):
    return request.param
