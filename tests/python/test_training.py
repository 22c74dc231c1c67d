"""Training sharded models: data parallel on top of tensor parallel on a 2-D mesh, and
torch.compile over tensor-parallel and split models, against the unsharded model."""
import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torch_mp
from distributed import run_ranks
from models import GPT


def check_dp_by_tp(rank, world):
    mesh = torch_mp.init_mesh(dp=2, tp=2)
    dp_rank = mesh["dp"].get_local_rank()
    torch.manual_seed(0)
    dense = GPT(vocab=97, dim=32, heads=4, depth=2)
    ids = torch.randint(0, 97, (4, 8))  # the global batch: each data-parallel rank takes half

    model = torch_mp.tensor_parallel(copy.deepcopy(dense), group=mesh["tp"])
    model = DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (dense, model)]
    for step in range(2):
        for m, optimizer, batch in ((dense, optimizers[0], ids), (model, optimizers[1], ids.chunk(2)[dp_rank])):
            optimizer.zero_grad()
            _, loss = m(batch, targets=batch)
            loss.backward()
            optimizer.step()
    gathered = torch_mp.full_state_dict(model.module)
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(gathered[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_dp_by_tp_matches_dense():
    run_ranks(4, check_dp_by_tp)


def check_bad_mesh(rank, world):
    with pytest.raises(ValueError, match=r"dp=3 x tp=1 = 3 ranks but the world has 2"):
        torch_mp.init_mesh(dp=3, tp=1)


def test_bad_mesh_is_a_clear_error():
    run_ranks(2, check_bad_mesh)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        torch_mp.init_mesh(dp=1)
