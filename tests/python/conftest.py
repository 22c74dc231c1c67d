import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def split_device_lists():
    """Device lists the split tests run on: two CPU stages always, a GPU and the CPU where a GPU exists."""
    lists = [["cpu", "cpu"]]
    if torch.cuda.is_available():
        lists.append(["cuda:0", "cpu"])
    return lists


@pytest.fixture(params=split_device_lists(), ids=lambda devices: "+".join(devices))
def devices(request):
    return request.param
