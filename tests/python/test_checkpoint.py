"""torch_mp.save / torch_mp.load: round trips (plain, split, tensor parallel), resharding to other
tensor-parallel sizes, atomicity (under SIGKILL, and a failed final rename), files the safetensors
library reads, clear errors, and a bit-identical resume. Malformed files: test_checkpoint_fuzz.py."""
import copy
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from distributed import run_ranks
from models import GPT, mlp

import torch_mp
from torch_mp._checkpoint.safetensors import SafetensorsFile, write_file

VOCAB = 96  # divisible by 4: the embedding and the tied head are split by rows
PLAN = {"tok": "vocab", "head": "colwise_gather", "blocks.*.attn.qkv": "qkv", "blocks.*.attn.proj": "rowwise",
        "blocks.*.mlp.0": "colwise", "blocks.*.mlp.2": "rowwise"}


def gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(vocab=VOCAB, dim=32, heads=4, depth=2)


def batch(seed):
    return torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(seed))


def adam_steps(model, steps, first_batch=0):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        ids = batch(first_batch + step)
        model(ids, targets=ids)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def assert_same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_optimizer(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for number, entries in a["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, b["state"][number][key]), (number, key)


def test_plain_round_trip_without_pickle(tmp_path, monkeypatch):
    model = gpt()
    optimizer = adam_steps(model, 1)
    def forbidden(*args, **kwargs):
        pytest.fail("pickle or torch.save/torch.load was called")

    for owner, name in ((pickle, "dump"), (pickle, "dumps"), (pickle, "load"), (pickle, "loads"),
                        (torch, "save"), (torch, "load")):
        monkeypatch.setattr(owner, name, forbidden)
    torch_mp.save(model, tmp_path / "ckpt", optimizer=optimizer, extra={"step": 1, "note": "plain"})
    fresh = gpt(seed=1)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.5, betas=(0.5, 0.5))
    assert torch_mp.load(fresh, tmp_path / "ckpt", optimizer=fresh_optimizer) == {"step": 1, "note": "plain"}
    monkeypatch.undo()
    assert_same_state(model, fresh)
    assert_same_optimizer(optimizer, fresh_optimizer)
    assert fresh.head.weight is fresh.tok.weight  # still tied
    # Only safetensors files and the JSON index; the tied weight is stored once.
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert files == ["rank-00000-of-00001.safetensors", "torch_mp_checkpoint.json"]
    assert "head.weight" not in set(SafetensorsFile(str(tmp_path / "ckpt" / files[0])).keys())
    index = json.loads((tmp_path / "ckpt" / files[1]).read_text())
    assert (index["format"], index["version"], index["tensors"]["head.weight"]["shape"]) == (
        "torch_mp.checkpoint", 1, [VOCAB, 32])
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(tmp_path / "ckpt" / files[0]), "pt") as handle:
        assert torch.equal(handle.get_tensor("tok.weight"), model.tok.weight)


def test_split_round_trip(tmp_path):
    dense = gpt()
    split = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"])
    torch_mp.save(split, tmp_path / "split")
    plain = gpt(seed=1)
    torch_mp.load(plain, tmp_path / "split")
    assert_same_state(dense, plain)
    torch_mp.save(dense, tmp_path / "plain")
    other = torch_mp.split(gpt(seed=2), ["cpu", "cpu"])
    torch_mp.load(other, tmp_path / "plain")
    ids = batch(0)
    assert torch.equal(other(ids), dense(ids))


# --- tensor parallel: round trip at TP=2, reshard to TP=1 and TP=4 ------------------------------

def gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def full_moments(model, optimizer):
    """Adam's moments as stock tensors ("exp_avg/<name>"), gathered like the parameters they follow."""
    params = dict(model.named_parameters())
    result = {}
    with torch.no_grad():
        kept = {name: param.clone() for name, param in params.items()}
        for key in ("exp_avg", "exp_avg_sq"):
            for param in params.values():
                param.copy_(optimizer.state[param][key])
            result.update({f"{key}/{name}": value for name, value in torch_mp.full_state_dict(model).items()
                           if name in params})
        for name, param in params.items():
            param.copy_(kept[name])
    return result


def check_save_at_tp2(rank, world, folder):
    model = torch_mp.tensor_parallel(gpt(), plan=PLAN)
    optimizer = adam_steps(model, 1)
    torch_mp.save(model, os.path.join(folder, "gpt"), optimizer=optimizer, extra={"step": 1})
    hf = torch_mp.tensor_parallel(gpt2())  # transformers' Conv1D: weights stored [in, out]
    torch_mp.save(hf, os.path.join(folder, "gpt2"))
    # The stock tensors, for the other sizes to compare with exactly.
    full, full_hf, moments = torch_mp.full_state_dict(model), torch_mp.full_state_dict(hf), full_moments(model, optimizer)
    if rank == 0:
        write_file(os.path.join(folder, "full.safetensors"), list(full.items()))
        write_file(os.path.join(folder, "moments.safetensors"), list(moments.items()))
        write_file(os.path.join(folder, "full_gpt2.safetensors"), list(full_hf.items()))
    # Back into TP=2 models built from other weights: the same shards and optimizer state.
    fresh = torch_mp.tensor_parallel(gpt(seed=1), plan=PLAN)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1.0)
    assert torch_mp.load(fresh, os.path.join(folder, "gpt"), optimizer=fresh_optimizer) == {"step": 1}
    assert_same_state(model, fresh)
    assert_same_optimizer(optimizer, fresh_optimizer)
    fresh_hf = torch_mp.tensor_parallel(gpt2(seed=1))
    torch_mp.load(fresh_hf, os.path.join(folder, "gpt2"))
    assert_same_state(hf, fresh_hf)


def assert_equals_file(state, path):
    reader = SafetensorsFile(path)
    assert set(state) == set(reader.keys())
    for key in sorted(reader.keys()):
        assert torch.equal(state[key], reader.read(key)), key


def check_load_at_tp4(rank, world, folder):
    with torch_mp.init_empty_weights():  # materialized by load with this rank's slices only
        model = gpt(seed=3)
    torch_mp.tensor_parallel(model, plan=PLAN)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch_mp.load(model, os.path.join(folder, "gpt"), optimizer=optimizer)
    assert_equals_file(torch_mp.full_state_dict(model), os.path.join(folder, "full.safetensors"))
    assert_equals_file(full_moments(model, optimizer), os.path.join(folder, "moments.safetensors"))
    hf = torch_mp.tensor_parallel(gpt2(seed=3))
    torch_mp.load(hf, os.path.join(folder, "gpt2"))
    assert_equals_file(torch_mp.full_state_dict(hf), os.path.join(folder, "full_gpt2.safetensors"))


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    """Checkpoints of GPT and transformers' GPT-2 saved at TP=2 (and loaded back there), with the
    stock tensors they hold, for the tests that load them at other sizes."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tp2")
    run_ranks(2, check_save_at_tp2, str(folder))
    return folder


def test_tensor_parallel_round_trip(tp2_checkpoint):
    files = sorted(os.listdir(tp2_checkpoint / "gpt"))
    assert files == ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors",
                     "torch_mp_checkpoint.json"]


def test_reshard_tp2_to_tp1(tp2_checkpoint):
    dense = gpt(seed=2)
    optimizer = torch.optim.Adam(dense.parameters(), lr=1e-2)
    torch_mp.load(dense, tp2_checkpoint / "gpt", optimizer=optimizer)
    assert_equals_file(dense.state_dict(), str(tp2_checkpoint / "full.safetensors"))
    assert_equals_file(full_moments(dense, optimizer), str(tp2_checkpoint / "moments.safetensors"))
    assert all(state["step"] == 1 for state in optimizer.state.values())
    hf = gpt2(seed=2)
    torch_mp.load(hf, tp2_checkpoint / "gpt2")
    assert_equals_file(hf.state_dict(), str(tp2_checkpoint / "full_gpt2.safetensors"))


def test_reshard_tp2_to_tp4(tp2_checkpoint):
    run_ranks(4, check_load_at_tp4, str(tp2_checkpoint))


# --- atomicity ---------------------------------------------------------------------------------

SAVER = """
import sys, torch, torch_mp
model = torch.nn.Sequential(*(torch.nn.Linear(2048, 2048) for _ in range(4)))  # 64 MiB
for step in range(1, 10**6):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    torch_mp.save(model, sys.argv[1], extra={"step": step})
"""


def wait_for(condition, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_killed_saver_leaves_the_previous_checkpoint(tmp_path, delay):
    path = str(tmp_path / "ckpt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(torch_mp.__file__)), os.environ.get("PYTHONPATH", "")]))
    saver = subprocess.Popen([sys.executable, "-c", SAVER, path], env=env)
    try:
        index = os.path.join(path, "torch_mp_checkpoint.json")
        wait_for(lambda: os.path.exists(index) and os.path.isdir(path + ".incomplete"), "a save in progress")
        time.sleep(delay)
        saver.send_signal(signal.SIGKILL)
        saver.wait(timeout=30)
    finally:
        saver.kill()
    model = torch.nn.Sequential(*(torch.nn.Linear(2048, 2048) for _ in range(4)))
    step = torch_mp.load(model, path)["step"]
    for name, param in model.named_parameters():
        assert torch.equal(param, torch.full_like(param, step)), name
    # The next save replaces what the killed one left behind.
    torch_mp.save(model, path, extra={"step": -1})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_failed_final_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """The guarantee itself: the save's last step (renaming the complete new checkpoint into place)
    fails, and the previous checkpoint still loads, whole."""
    path = str(tmp_path / "ckpt")
    previous = mlp()
    torch_mp.save(previous, path, extra={"version": 1})
    rename, replace = os.rename, os.replace

    def failing(move):
        def call(source, target, *args, **kwargs):
            if os.fspath(source).endswith(".incomplete"):
                raise OSError(28, "No space left on device (simulated)")
            return move(source, target, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "rename", failing(rename))
    monkeypatch.setattr(os, "replace", failing(replace))
    with pytest.raises(OSError, match="simulated"):
        torch_mp.save(mlp(), path, extra={"version": 2})
    monkeypatch.undo()
    loaded = mlp()
    assert torch_mp.load(loaded, path) == {"version": 1}
    assert_same_state(previous, loaded)
    torch_mp.save(loaded, path, extra={"version": 3})  # and the next save cleans up
    assert torch_mp.load(mlp(), path) == {"version": 3}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_crash_between_the_two_renames(tmp_path):
    path = str(tmp_path / "ckpt")
    model = mlp()
    torch_mp.save(model, path, extra={"version": 1})
    os.rename(path, path + ".old")  # what a crash after the first of the two renames leaves
    os.makedirs(path + ".incomplete")
    assert torch_mp.load(mlp(), path) == {"version": 1}
    torch_mp.save(model, path, extra={"version": 2})
    assert torch_mp.load(mlp(), path) == {"version": 2}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_written_files_read_back_by_the_safetensors_library(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    tensors = [("f32", torch.randn(3, 5)), ("bf16", torch.randn(4).bfloat16()), ("i64", torch.arange(6).view(2, 3)),
               ("bool", torch.tensor([True, False])), ("u8", torch.arange(3, dtype=torch.uint8)),
               ("scalar", torch.tensor(2.5)), ("empty", torch.zeros(0, 3)), ("strided", torch.randn(4, 6).t())]
    write_file(str(tmp_path / "t.safetensors"), tensors)
    with safetensors.safe_open(str(tmp_path / "t.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == sorted(name for name, _ in tensors)
        for name, tensor in tensors:
            assert torch.equal(handle.get_tensor(name), tensor), name
    reader = SafetensorsFile(str(tmp_path / "t.safetensors"))
    assert torch.equal(reader.read_slices("strided", 1, [(0, 1), (3, 4)]), tensors[-1][1][:, [0, 3]])


def test_checkpoint_reached_through_a_symlink_loads(tmp_path):
    """A symlink to the checkpoint folder itself ("latest" -> a step's folder) is no escape: its
    files lie inside the folder it resolves to."""
    model = mlp()
    torch_mp.save(model, tmp_path / "step-100")
    os.symlink(tmp_path / "step-100", tmp_path / "latest")
    loaded = mlp()
    torch_mp.load(loaded, tmp_path / "latest")
    assert_same_state(model, loaded)


# --- errors ------------------------------------------------------------------------------------

def test_corrupted_byte_is_a_checksum_error(tmp_path):
    torch_mp.save(mlp(), tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "rank-00000-of-00001.safetensors"
    data = bytearray(file.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8:8 + header_length])["6.bias"]["data_offsets"]
    data[8 + header_length + start] ^= 0x40
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checksum mismatch in .*rank-00000-of-00001\.safetensors for '6\.bias'"):
        torch_mp.load(mlp(), tmp_path / "ckpt")


def test_corrupted_byte_of_a_tensor_parallel_shard_is_a_checksum_error(tp2_checkpoint, tmp_path):
    """One flipped byte in rank 1's shard of a colwise weight: every load that reads that shard
    (into the dense model, or its slice at any size) names the file and the tensor."""
    shutil.copytree(tp2_checkpoint / "gpt", tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "rank-00001-of-00002.safetensors"
    data = bytearray(file.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    start, stop = json.loads(data[8:8 + header_length])["blocks.0.mlp.0.weight"]["data_offsets"]
    data[8 + header_length + (start + stop) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    error = r"checksum mismatch in .*rank-00001-of-00002\.safetensors for 'blocks\.0\.mlp\.0\.weight'"
    with pytest.raises(ValueError, match=error):
        torch_mp.load(gpt(), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=error):
        torch_mp.load_full_state_dict(gpt(), tmp_path / "ckpt")


def test_load_errors_name_what_is_wrong(tmp_path):
    path = tmp_path / "ckpt"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint found"):
        torch_mp.load(mlp(), path)
    torch_mp.save(mlp(), path)
    with pytest.raises(ValueError, match=r"'6.weight' has shape \(8, 32\) in the checkpoint .*expects \(9, 32\)"):
        torch_mp.load(mlp((16, 32, 32, 32, 9)), path)
    with pytest.raises(ValueError, match=r"lacks keys \['8.weight', '8.bias'\]"):
        torch_mp.load(mlp((16, 32, 32, 32, 8, 8)), path)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        model = mlp()
        torch_mp.load(model, path, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="extra must hold only JSON values"):
        torch_mp.save(mlp(), path, extra={"tensor": torch.zeros(1)})
    (tmp_path / "file").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match="exists and is not a torch_mp checkpoint"):
        torch_mp.save(mlp(), tmp_path / "file")
    os.makedirs(str(tmp_path / "half") + ".incomplete")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint found .*a save that did not finish"):
        torch_mp.load(mlp(), tmp_path / "half")


# --- resume: bit-identical losses --------------------------------------------------------------

STEPS = 3


def train(rank, world, folder, phase):
    """``whole``: 2 * STEPS steps; ``first``: STEPS steps, then save; ``second``: new processes
    that load and run STEPS more. Batches come from the global CPU generator, which the checkpoint
    carries over."""
    model = torch_mp.tensor_parallel(gpt(seed=5 if phase == "second" else 0), plan=PLAN)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(100)
    losses = []
    if phase == "second":
        losses = torch_mp.load(model, os.path.join(folder, "ckpt"), optimizer=optimizer)["losses"]
    for _ in range(2 * STEPS if phase == "whole" else STEPS):
        ids = torch.randint(0, VOCAB, (4, 8))
        _, loss = model(ids, targets=ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    if phase == "first":
        torch_mp.save(model, os.path.join(folder, "ckpt"), optimizer=optimizer, extra={"losses": losses})
    elif rank == 0:
        with open(os.path.join(folder, f"{phase}.json"), "w") as handle:
            json.dump(losses, handle)


def train_whole_then_first(rank, world, folder):
    train(rank, world, folder, "whole")
    train(rank, world, folder, "first")


@pytest.fixture(scope="module")
def saved_mid_run(tmp_path_factory):
    """2 * STEPS steps uninterrupted, and STEPS steps then a save, in the same two processes (each
    phase starts from its seeds); the resume runs in new ones."""
    folder = tmp_path_factory.mktemp("resume")
    run_ranks(2, train_whole_then_first, str(folder))
    return folder


def test_uninterrupted_and_saved_runs(saved_mid_run):
    assert len(json.loads((saved_mid_run / "whole.json").read_text())) == 2 * STEPS
    assert len(torch_mp.load(gpt(), saved_mid_run / "ckpt", restore_rng=False)["losses"]) == STEPS


def test_resume_gives_bit_identical_losses(saved_mid_run):
    run_ranks(2, train, str(saved_mid_run), "second")
    whole = json.loads((saved_mid_run / "whole.json").read_text())
    resumed = json.loads((saved_mid_run / "second.json").read_text())
    assert resumed == whole  # exact: JSON keeps every bit of a float
