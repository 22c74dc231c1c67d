"""Bad input to every public function: the exception type, and a message naming the argument and
what was expected. A table of cases at world size 1 (in this process), one of cases that need a
group of two (Gloo ranks), and zero-size batches, which are not bad input: they work."""
import json
import os
import re
import struct
import tempfile
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from models import GPT, mlp
from torch import nn

import torch_mp
from torch_mp._checkpoint.safetensors import write_file
from torch_mp.nn import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelMultiheadAttention,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)


BAD_FILES = tempfile.TemporaryDirectory(prefix="torch_mp_bad_input_")  # removed at exit


def bad_checkpoint(name: str, edit, link_to_outside=False) -> str:
    """A torch_mp.save checkpoint of mlp() at BAD_FILES/name whose index is ``edit(index, outside)``
    (a dict, or the bytes to write); ``outside``: a valid checkpoint beside it, which an escaping
    name would read; ``link_to_outside``: link.safetensors in the folder points at its file."""
    outside = os.path.join(BAD_FILES.name, "outside")
    if not os.path.isdir(outside):
        torch_mp.save(mlp(), outside)
    path = os.path.join(BAD_FILES.name, name)
    torch_mp.save(mlp(), path)
    if link_to_outside:
        os.symlink(os.path.join(outside, "rank-00000-of-00001.safetensors"), os.path.join(path, "link.safetensors"))
    index_path = os.path.join(path, "torch_mp_checkpoint.json")
    with open(index_path) as handle:
        index = edit(json.load(handle), outside)
    with open(index_path, "wb") as handle:
        handle.write(index if isinstance(index, bytes) else json.dumps(index).encode())
    return path


def with_files(index: dict, file: str) -> dict:
    for entry in index["tensors"].values():
        entry["pieces"][0]["file"] = file
    return index


def with_entry(index: dict, key: str, **fields) -> dict:
    index["tensors"][key].update(fields)
    return index


def bad_safetensors(name: str, header: bytes, data: bytes = b"", length=None) -> str:
    """BAD_FILES/name/model.safetensors holding the raw ``header`` (its length: ``length`` if given)."""
    folder = os.path.join(BAD_FILES.name, name)
    os.makedirs(folder)
    with open(os.path.join(folder, "model.safetensors"), "wb") as handle:
        handle.write(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return os.path.join(folder, "model.safetensors")


def bad_folder(name: str, files: dict, links: dict = None) -> str:
    """BAD_FILES/name holding ``files`` ({name: bytes}) and symlinks ``links`` ({name: target})."""
    folder = os.path.join(BAD_FILES.name, name)
    os.makedirs(folder)
    for file, data in files.items():
        with open(os.path.join(folder, file), "wb") as handle:
            handle.write(data)
    for link, target in (links or {}).items():
        os.symlink(target, os.path.join(folder, link))
    return folder


def saved_file() -> str:
    """A valid safetensors file of mlp(), outside the folders that name it."""
    path = os.path.join(BAD_FILES.name, "elsewhere.safetensors")
    if not os.path.exists(path):
        write_file(path, list(mlp().state_dict().items()))
    return path


class Case(NamedTuple):
    name: str
    call: Callable[[], object]
    error: type[BaseException]
    patterns: list[str]  # regexes that must all appear in the message


def x(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (2, 4)), dtype=dtype)


MISSING = os.path.join(os.sep, "nonexistent", "model.pt")


CASES = [
    # --- to_device
    Case("to_device/tensor is a list", lambda: torch_mp.to_device([1.0], "cpu"), TypeError,
         [r"to_device: expected tensor to be a torch\.Tensor", "got list"]),
    Case("to_device/unknown device", lambda: torch_mp.to_device(x(), "tpu"), ValueError,
         [r"to_device: device = 'tpu' is not a device", "expected a torch.device"]),
    Case("to_device/device of a wrong type", lambda: torch_mp.to_device(x(), 1.5), TypeError,
         [r"to_device: expected device to be a torch\.device", "got float 1.5"]),
    Case("to_device/unavailable device", lambda: torch_mp.to_device(x(), "cuda:99"), ValueError,
         [r"torch_mp\.to_device\(device=\.\.\.\): device 'cuda:99' is not available"]),
    Case("to_device/non_blocking not a bool", lambda: torch_mp.to_device(x(), "cpu", "yes"), TypeError,
         ["to_device: expected non_blocking to be a bool", "got str 'yes'"]),
    # --- the conjugate pairs
    Case("copy_to_tp/tensor is a list", lambda: torch_mp.copy_to_tp([1.0]), TypeError,
         [r"copy_to_tp: expected tensor to be a torch\.Tensor", "got list"]),
    Case("reduce_from_tp/group is a string", lambda: torch_mp.reduce_from_tp(x(), group="tp"), TypeError,
         [r"reduce_from_tp\(group=\.\.\.\): expected a ProcessGroup, a 1-D DeviceMesh or None, got str"]),
    Case("gather_from_tp/dim out of range", lambda: torch_mp.gather_from_tp(x(), dim=2), IndexError,
         [r"torch_mp\.gather_from_tp: dim 2 is out of range for an input with 2 dims", r"\[-2, 1\]"]),
    Case("scatter_to_tp/0-dim tensor", lambda: torch_mp.scatter_to_tp(torch.tensor(1.0)), IndexError,
         [r"torch_mp\.scatter_to_tp: dim -1", "expected an input with at least one dim"]),
    Case("scatter_to_tp/dim is a string", lambda: torch_mp.scatter_to_tp(x(), dim="0"), TypeError,
         ["scatter_to_tp: expected dim to be an int", "got str '0'"]),
    Case("reduce_scatter_to_sp/dim is a bool", lambda: torch_mp.reduce_scatter_to_sp(x(), dim=True), TypeError,
         ["reduce_scatter_to_sp: expected dim to be an int", "got bool True"]),
    Case("gather_from_sp/tensor is None", lambda: torch_mp.gather_from_sp(None), TypeError,
         ["gather_from_sp: expected tensor to be a torch.Tensor", "got NoneType"]),
    # --- async TP ops
    Case("all_gather_matmul/no weights", lambda: torch_mp.all_gather_matmul(x(2, 4, 8), []), ValueError,
         [r"torch_mp\.all_gather_matmul: weights is empty; expected at least one weight"]),
    Case("all_gather_matmul/chunks do not divide", lambda: torch_mp.all_gather_matmul(x(2, 4, 8), [x(3, 8)], chunks=3),
         ValueError, [r"all_gather_matmul: each rank holds 4 rows along dim 1, not divisible into chunks=3"]),
    Case("all_gather_matmul/dim is the features", lambda: torch_mp.all_gather_matmul(x(2, 4, 8), [x(3, 8)], dim=-1),
         ValueError, [r"all_gather_matmul: dim -1 is the features dim \(the last\)", "expected the sequence"]),
    Case("all_gather_matmul/chunks is a float", lambda: torch_mp.all_gather_matmul(x(2, 4, 8), [x(3, 8)], chunks=2.0),
         TypeError, ["all_gather_matmul: expected chunks to be an int"]),
    Case("matmul_reduce_scatter/features differ", lambda: torch_mp.matmul_reduce_scatter(x(2, 4, 8), x(3, 5)),
         ValueError, [r"matmul_reduce_scatter: input has 8 features \(its last dim\) but weight has shape \[3, 5\]"]),
    # --- the parallel linear ops
    Case("column_parallel_linear/input is a list", lambda: torch_mp.column_parallel_linear([1.0], x(6, 4)),
         TypeError, ["column_parallel_linear: expected input to be a torch.Tensor"]),
    Case("column_parallel_linear/weight is a vector", lambda: torch_mp.column_parallel_linear(x(), x(6)),
         ValueError, [r"torch_mp\.column_parallel_linear: weight has shape \[6\]",
                      r"expected a matrix \[out_features / group size, in_features\]"]),
    Case("column_parallel_linear/features differ", lambda: torch_mp.column_parallel_linear(x(), x(6, 5)),
         ValueError, [r"input has 4 features \(its last dim\) but weight has shape \[6, 5\]",
                      r"expected weight \[out_features / group size, in_features\]"]),
    Case("column_parallel_linear/bias of a wrong shape",
         lambda: torch_mp.column_parallel_linear(x(), x(6, 4), x(5)), ValueError,
         [r"bias has shape \[5\]", r"expected \[6\], one entry per row of weight"]),
    Case("column_parallel_linear/weight dtype", lambda: torch_mp.column_parallel_linear(x(), x(6, 4, dtype=torch.float64)),
         TypeError, ["weight has dtype Double but input has dtype Float", "expected the same dtype"]),
    Case("column_parallel_linear/weight device",
         lambda: torch_mp.column_parallel_linear(x().to("meta"), x(6, 4)), ValueError,
         ["weight is on cpu but input is on meta", "expected both on one device"]),
    Case("column_parallel_linear/0-dim input", lambda: torch_mp.column_parallel_linear(torch.tensor(1.0), x(6, 4)),
         ValueError, [r"input is a 0-dim tensor; expected input of shape \[\*, in_features\]"]),
    Case("column_parallel_linear/gather_output not a bool",
         lambda: torch_mp.column_parallel_linear(x(), x(6, 4), gather_output="no"), TypeError,
         ["column_parallel_linear: expected gather_output to be a bool", "got str 'no'"]),
    Case("row_parallel_linear/features differ", lambda: torch_mp.row_parallel_linear(x(), x(6, 3)), ValueError,
         [r"torch_mp\.row_parallel_linear: input has 4 features", r"weight has shape \[6, 3\]",
          r"expected weight \[out_features, in_features / group size\]"]),
    Case("row_parallel_linear/bias of a wrong shape", lambda: torch_mp.row_parallel_linear(x(), x(6, 4), x(4)),
         ValueError, [r"torch_mp\.row_parallel_linear: bias has shape \[4\]", r"expected \[6\]"]),
    Case("row_parallel_linear/input_is_parallel not a bool",
         lambda: torch_mp.row_parallel_linear(x(), x(6, 4), input_is_parallel=None), TypeError,
         ["row_parallel_linear: expected input_is_parallel to be a bool", "got NoneType None"]),
    # --- layers
    Case("ColumnParallelLinear/negative out_features", lambda: ColumnParallelLinear(4, -6), ValueError,
         ["ColumnParallelLinear: out_features=-6; expected a size >= 0"]),
    Case("ColumnParallelLinear/in_features a float", lambda: ColumnParallelLinear(4.0, 6), TypeError,
         ["ColumnParallelLinear: expected in_features to be an int", "got float 4.0"]),
    Case("ColumnParallelLinear/wrong input features", lambda: ColumnParallelLinear(4, 6)(x(2, 5)), ValueError,
         [r"column_parallel_linear: input has 5 features", r"weight has shape \[6, 4\]"]),
    Case("ColumnParallelLinear.from_dense/not a Linear", lambda: ColumnParallelLinear.from_dense(nn.Conv1d(4, 4, 1)),
         TypeError, ["ColumnParallelLinear.from_dense: expected linear to be an nn.Linear", "got Conv1d"]),
    Case("RowParallelLinear/group is a string", lambda: RowParallelLinear(4, 6, group="x"), TypeError,
         [r"RowParallelLinear\(group=\.\.\.\): expected a ProcessGroup"]),
    Case("RowParallelLinear/negative out_features", lambda: RowParallelLinear(4, -1), ValueError,
         ["RowParallelLinear: out_features=-1; expected a size >= 0"]),
    Case("RowParallelLinear/input dtype", lambda: RowParallelLinear(4, 6)(x(dtype=torch.float64)), TypeError,
         ["row_parallel_linear: weight has dtype Float but input has dtype Double"]),
    Case("RowParallelLinear.from_dense/not a Linear", lambda: RowParallelLinear.from_dense(nn.Identity()),
         TypeError, ["RowParallelLinear.from_dense: expected linear to be an nn.Linear", "got Identity"]),
    Case("VocabParallelEmbedding/float ids", lambda: VocabParallelEmbedding(10, 4)(x(3)), TypeError,
         ["vocab_parallel_embedding: input has dtype Float; expected integer indices"]),
    Case("VocabParallelEmbedding/negative embedding_dim", lambda: VocabParallelEmbedding(10, -4), ValueError,
         ["VocabParallelEmbedding: embedding_dim=-4; expected a size >= 0"]),
    Case("VocabParallelEmbedding.from_dense/not an Embedding",
         lambda: VocabParallelEmbedding.from_dense(nn.Linear(4, 4)), TypeError,
         ["VocabParallelEmbedding.from_dense: expected embedding to be an nn.Embedding", "got Linear"]),
    Case("TensorParallelMultiheadAttention/not an attention",
         lambda: TensorParallelMultiheadAttention(nn.Linear(4, 4)), TypeError,
         ["TensorParallelMultiheadAttention: expected dense to be an nn.MultiheadAttention", "got Linear"]),
    Case("vocab_parallel_cross_entropy/shapes differ",
         lambda: vocab_parallel_cross_entropy(x(3, 10), torch.zeros(4, dtype=torch.long)), ValueError,
         [r"logits of shape \[3, 10\] and target of shape \[4\]",
          r"expected logits of shape \[\*target\.shape, vocab on this rank\]"]),
    Case("vocab_parallel_cross_entropy/float target", lambda: vocab_parallel_cross_entropy(x(3, 10), x(3)),
         TypeError, ["target has dtype Float; expected integer class indices"]),
    Case("vocab_parallel_cross_entropy/integer logits",
         lambda: vocab_parallel_cross_entropy(torch.ones(3, 10, dtype=torch.long), torch.zeros(3, dtype=torch.long)),
         TypeError, ["logits has dtype Long; expected a floating point dtype"]),
    Case("vocab_parallel_cross_entropy/0-dim logits",
         lambda: vocab_parallel_cross_entropy(torch.tensor(1.0), torch.tensor(0)), ValueError,
         [r"logits of shape \[\] and target of shape \[\]"]),
    Case("vocab_parallel_cross_entropy/reduction",
         lambda: vocab_parallel_cross_entropy(x(3, 10), torch.zeros(3, dtype=torch.long), reduction="avg"),
         ValueError, ["reduction='avg'; expected 'mean', 'sum' or 'none'"]),
    Case("vocab_parallel_cross_entropy/logits a list",
         lambda: vocab_parallel_cross_entropy([1.0], torch.zeros(1, dtype=torch.long)), TypeError,
         ["vocab_parallel_cross_entropy: expected logits to be a torch.Tensor"]),
    # --- split
    Case("split/module a string", lambda: torch_mp.split("model", ["cpu"]), TypeError,
         ["split: expected module to be a torch.nn.Module, got str"]),
    Case("split/no devices", lambda: torch_mp.split(mlp(), []), ValueError,
         ["split: devices is empty; expected at least one device"]),
    Case("split/balance does not add up", lambda: torch_mp.split(mlp(), ["cpu", "cpu"], balance=[1, 1]),
         ValueError, [r"balance \[1, 1\] adds up to 2 layers but the model has 7 layers"]),
    Case("split/max_memory not a size", lambda: torch_mp.split(mlp(), ["cpu"], max_memory=["lots"]), ValueError,
         [r"max_memory\[0\] = 'lots' is not a size", "expected e.g."]),
    Case("split/output_device unknown", lambda: torch_mp.split(mlp(), ["cpu"], output_device="tpu"), ValueError,
         ["split: output_device = 'tpu' is not a device"]),
    Case("split/layers a string", lambda: torch_mp.split(mlp(), ["cpu"], layers="0"), TypeError,
         ["split: expected layers to be a list of module names"]),
    # --- tensor_parallel
    Case("tensor_parallel/module a string", lambda: torch_mp.tensor_parallel("model"), TypeError,
         ["tensor_parallel: expected module to be a torch.nn.Module, got str"]),
    Case("tensor_parallel/plan an unknown string", lambda: torch_mp.tensor_parallel(GPT(), plan="none"), ValueError,
         ["tensor_parallel: plan='none'; expected 'auto' or a {pattern: style} dict"]),
    Case("tensor_parallel/plan an int", lambda: torch_mp.tensor_parallel(GPT(), plan=5), TypeError,
         ["tensor_parallel: expected plan to be 'auto' or a dict, got int"]),
    Case("tensor_parallel/unknown style", lambda: torch_mp.tensor_parallel(mlp(), plan={"0": "diagonal"}), ValueError,
         [r"plan\['0'\] = 'diagonal'", "expected one of colwise"]),
    Case("tensor_parallel/pattern matches nothing", lambda: torch_mp.tensor_parallel(mlp(), plan={"x.*": "colwise"}),
         ValueError, [r"plan pattern 'x\.\*' matches no module", "expected a glob over names"]),
    Case("tensor_parallel/style for another kind of layer",
         lambda: torch_mp.tensor_parallel(mlp(), plan={"0": "vocab"}), ValueError,
         ["style 'vocab' for '0', a Linear; expected an nn.Embedding"]),
    Case("tensor_parallel/group a string", lambda: torch_mp.tensor_parallel(GPT(), group="tp"), TypeError,
         [r"tensor_parallel\(group=\.\.\.\): expected a ProcessGroup"]),
    Case("tensor_parallel/nothing to shard", lambda: torch_mp.tensor_parallel(nn.Sequential(nn.ReLU(), nn.ReLU())),
         ValueError, ["found no attention or MLP to shard in Sequential", "pass plan="]),
    # --- state
    Case("full_state_dict/module a string", lambda: torch_mp.full_state_dict("model"), TypeError,
         ["full_state_dict: expected module to be a torch.nn.Module, got str"]),
    Case("load_full_state_dict/source an int", lambda: torch_mp.load_full_state_dict(mlp(), 5), TypeError,
         ["load_full_state_dict: expected state_dict_or_path to be a state_dict or the path", "got int 5"]),
    Case("load_full_state_dict/missing file", lambda: torch_mp.load_full_state_dict(mlp(), MISSING),
         FileNotFoundError, ["load_full_state_dict: state_dict_or_path=.*model.pt' does not exist"]),
    Case("load_full_state_dict/missing keys", lambda: torch_mp.load_full_state_dict(mlp(), {}), ValueError,
         [r"missing keys \['0.bias', '0.weight'", "expected the stock state_dict of this model"]),
    Case("load_full_state_dict/wrong shape",
         lambda: torch_mp.load_full_state_dict(nn.Linear(4, 2), {"weight": x(2, 3), "bias": x(2)}), ValueError,
         [r"'weight' has shape \(2, 3\) in the source but \(2, 4\) is expected"]),
    Case("init_empty_weights/an argument", lambda: torch_mp.init_empty_weights(1), TypeError,
         ["init_empty_weights.* takes 0 positional arguments"]),
    Case("memory_report/module a string", lambda: torch_mp.memory_report("model"), TypeError,
         ["memory_report: expected module to be a torch.nn.Module, got str"]),
    Case("init_mesh/not initialized", lambda: torch_mp.init_mesh(tp=2), RuntimeError,
         ["init_mesh: torch.distributed is not initialized; expected init_process_group"]),
    # --- the primitive ops, as torch.ops.torch_mp.* (the group by name and size)
    Case("_all_reduce/unknown reduce_op", lambda: torch.ops.torch_mp._all_reduce(x(), "mean", "", 1), ValueError,
         ["reduce_op 'mean'; expected sum, max, min or product"]),
    Case("_shard/group_size 0", lambda: torch.ops.torch_mp._shard(x(), 0, "", 0), ValueError,
         ["torch_mp.shard: group_size is 0; expected at least 1"]),
    Case("_all_gather/group_size 0", lambda: torch.ops.torch_mp._all_gather(x(), 0, "", 0), ValueError,
         ["torch_mp.all_gather: group_size is 0; expected at least 1"]),
    Case("_reduce_scatter/indivisible", lambda: torch.ops.torch_mp._reduce_scatter(x(3, 4), 0, "nope", 2),
         ValueError, ["input size 3 along dim 0 is not divisible by the group size 2; expected a multiple of 2"]),
    Case("reduce_from_tp/no such group", lambda: torch.ops.torch_mp.reduce_from_tp(x(), "nope", 2), ValueError,
         ["no process group named 'nope' is registered in this process"]),
    Case("copy_to_tp/no such group, found in forward", lambda: torch.ops.torch_mp.copy_to_tp(x(), "nope", 2),
         ValueError, ["torch_mp.copy_to_tp: no process group named 'nope'"]),
    # --- pipelines: split(chunks=M), pipeline (a group of one outside torch.distributed), train_step
    Case("split/chunks 0", lambda: torch_mp.split(mlp(), ["cpu", "cpu"], chunks=0), ValueError,
         [r"chunks = 0; expected an int >= 1"]),
    Case("split/unknown schedule", lambda: torch_mp.split(mlp(), ["cpu", "cpu"], chunks=2, schedule="zigzag"),
         ValueError, [r"schedule = 'zigzag'; expected one of \['gpipe', '1f1b', 'zb_h1', 'zbv'\]"]),
    Case("split/unknown checkpoint", lambda: torch_mp.split(mlp(), ["cpu", "cpu"], checkpoint="sometimes"),
         ValueError, [r"checkpoint = 'sometimes'; expected one of \['never', 'except_last', 'always'\]"]),
    Case("split/balance by time without a sample", lambda: torch_mp.split(mlp(), ["cpu", "cpu"], balance="time"),
         ValueError, [r"balance='time' needs sample="]),
    Case("train_step/loss_fn not callable", lambda: torch_mp.split(mlp(), ["cpu", "cpu"], chunks=2).train_step(
        x(4, 16), target=x(4, 8), loss_fn="mse"), TypeError, [r"loss_fn = 'mse'; expected a callable"]),
    Case("train_step/loss not a scalar", lambda: torch_mp.split(mlp(), ["cpu", "cpu"], chunks=2).train_step(
        x(4, 16), target=x(4, 8), loss_fn=lambda output, target: output - target), ValueError,
         [r"loss_fn returned \[2, 8\]; expected a scalar tensor"]),
    Case("pipeline/module is a string", lambda: torch_mp.pipeline("model"), TypeError,
         [r"pipeline: expected module to be a torch.nn.Module, got str"]),
    Case("pipeline/group is a string", lambda: torch_mp.pipeline(mlp(), group="pp"), TypeError,
         [r"pipeline\(group=\.\.\.\): expected a ProcessGroup, a 1-D DeviceMesh or None, got str"]),
    Case("pipeline/unknown schedule", lambda: torch_mp.pipeline(mlp(), schedule="zigzag"), ValueError,
         [r"pipeline: schedule = 'zigzag'; expected one of \['gpipe', '1f1b', 'interleaved_1f1b', 'zb_h1', 'zbv'\]"]),
    Case("pipeline/1f1b with two stages per rank", lambda: torch_mp.pipeline(mlp(), stages_per_rank=2), ValueError,
         [r"schedule '1f1b' runs one stage per rank but stages_per_rank = 2; expected 1, or schedule "
          "'interleaved_1f1b'"]),
    Case("pipeline/stages_per_rank 0", lambda: torch_mp.pipeline(mlp(), schedule="gpipe", stages_per_rank=0),
         ValueError, [r"pipeline: stages_per_rank = 0; expected an int >= 1"]),
    Case("pipeline/balance for other stages", lambda: torch_mp.pipeline(mlp(), balance=[1, 2]), ValueError,
         [r"pipeline: balance \[1, 2\] has 2 entries but there are 1 stages \(1 ranks x 1\); expected one layer "
          "count per stage"]),
    Case("pipeline/unknown device", lambda: torch_mp.pipeline(mlp(), device="tpu"), ValueError,
         [r"pipeline: device = 'tpu' is not a device"]),
    # --- checkpoints
    Case("save/module is a string", lambda: torch_mp.save("model", MISSING), TypeError,
         [r"torch_mp.save: expected module to be a torch.nn.Module, got str"]),
    Case("save/optimizer is a string", lambda: torch_mp.save(mlp(), MISSING, optimizer="adam"), TypeError,
         [r"torch_mp.save: expected optimizer to be a torch.optim.Optimizer or None, got str"]),
    Case("load/no checkpoint there", lambda: torch_mp.load(mlp(), MISSING), FileNotFoundError,
         [r"torch_mp.load: no complete checkpoint found at '.*model.pt'; expected a folder written by "
          "torch_mp.save"]),
    # --- checkpoints from strangers: names leaving the folder, malformed files (issue 16)
    Case("load/piece file with ..", lambda: torch_mp.load(mlp(), bad_checkpoint(
        "dotdot", lambda index, _: with_files(index, "../outside/rank-00000-of-00001.safetensors"))),
         ValueError, [r"torch_mp.load: .*dotdot/torch_mp_checkpoint.json: tensor '0.weight' piece 0 names the file "
                      r"'../outside/rank-00000-of-00001.safetensors'; expected a relative path inside .*dotdot "
                      r"\(no absolute path, no '..'\)"]),
    Case("load/piece file absolute", lambda: torch_mp.load(mlp(), bad_checkpoint(
        "absolute", lambda index, outside: with_files(index, os.path.join(outside, "rank-00000-of-00001.safetensors")))),
         ValueError, [r"tensor '0.weight' piece 0 names the file '/.*outside/rank-00000-of-00001.safetensors'; "
                      "expected a relative path"]),
    Case("load/piece file a symlink out of the folder", lambda: torch_mp.load(mlp(), bad_checkpoint(
        "symlink", lambda index, _: with_files(index, "link.safetensors"), link_to_outside=True)), ValueError,
         [r"piece 0 names the file 'link.safetensors', which resolves to .*outside/rank-00000-of-00001.safetensors, "
          r"outside the checkpoint folder .*symlink; expected a file inside it"]),
    Case("load/index not JSON", lambda: torch_mp.load(mlp(), bad_checkpoint(
        "index_not_json", lambda index, _: b"{not json")), ValueError,
         [r"torch_mp.load: .*index_not_json/torch_mp_checkpoint.json is not valid JSON \(Expecting"]),
    Case("load/piece bounds beyond the shape", lambda: torch_mp.load(mlp(), bad_checkpoint(
        "bounds", lambda index, _: with_entry(index, "0.weight", dim=0, pieces=[
            {**index["tensors"]["0.weight"]["pieces"][0], "bounds": [[0, 99]]}]))), ValueError,
         [r"bounds/torch_mp_checkpoint.json: tensor '0.weight' piece 0 has bounds \[\[0, 99\]\]; expected null "
          r"for a whole tensor, else \[start, stop\] ranges within \[0, 32\]"]),
    Case("load/shape 2^40 x 2^40 in the index", lambda: torch_mp.load(mlp(), bad_checkpoint(
        "index_huge_shape", lambda index, _: with_entry(index, "0.weight", shape=[2**40, 2**40]))), ValueError,
         [r"torch_mp.load: '0.weight' has shape \(1099511627776, 1099511627776\) in the checkpoint at "
          r".*index_huge_shape; the model expects \(32, 16\)"]),
    Case("load_full_state_dict/header claims 10^12 bytes",
         lambda: torch_mp.load_full_state_dict(mlp(), bad_safetensors("huge_header", b"{}", length=10**12)),
         ValueError, [r"load_full_state_dict: .*huge_header/model.safetensors is not a valid safetensors file: "
                      r".*header too large"]),
    Case("load_full_state_dict/negative data_offsets",
         lambda: torch_mp.load_full_state_dict(mlp(), bad_safetensors("negative_offsets", json.dumps(
             {"0.bias": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}).encode(), b"1234")),
         ValueError, [r"negative_offsets/model.safetensors is not a valid safetensors file: .*integer `-4`"]),
    Case("load_full_state_dict/header not JSON",
         lambda: torch_mp.load_full_state_dict(mlp(), bad_safetensors("header_not_json", b"not json")),
         ValueError, [r"header_not_json/model.safetensors is not a valid safetensors file: .*invalid JSON"]),
    Case("load_full_state_dict/shape 2^40 x 2^40",
         lambda: torch_mp.load_full_state_dict(mlp(), bad_safetensors("huge_shape", json.dumps(
             {"0.bias": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}).encode(), b"1234")),
         ValueError, [r"huge_shape/model.safetensors is not a valid safetensors file: .*overflow"]),
    Case("load_full_state_dict/truncated file",
         lambda: torch_mp.load_full_state_dict(mlp(), bad_safetensors("truncated", json.dumps(
             {"0.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(), b"1234")),
         ValueError, [r"truncated/model.safetensors is not a valid safetensors file"]),
    Case("load_full_state_dict/transformers index naming ..",
         lambda: torch_mp.load_full_state_dict(mlp(), bad_folder("hf_dotdot", {
             "model.safetensors.index.json": json.dumps({"weight_map": {"0.weight": "../elsewhere.safetensors"}})
             .encode()})), ValueError,
         [r"load_full_state_dict: .*hf_dotdot/model.safetensors.index.json: weight_map\['0.weight'\] names the "
          r"file '../elsewhere.safetensors'; expected a relative path inside"]),
    Case("load_full_state_dict/transformers index not JSON",
         lambda: torch_mp.load_full_state_dict(mlp(), bad_folder("hf_not_json", {
             "model.safetensors.index.json": b"{"})), ValueError,
         [r"load_full_state_dict: .*hf_not_json/model.safetensors.index.json is not a transformers index "
          r"\(JSONDecodeError"]),
    Case("load_full_state_dict/folder listing a symlink out of the folder",
         lambda: torch_mp.load_full_state_dict(mlp(), bad_folder("listing_symlink", {}, {
             "model.safetensors": saved_file()})), ValueError,
         [r"load_full_state_dict: the listing of .*listing_symlink names the file 'model.safetensors', which "
          r"resolves to .*elsewhere.safetensors, outside the checkpoint folder"]),
]


def check_case(case: Case) -> None:
    with pytest.raises(case.error) as raised:
        case.call()
    message = str(raised.value)
    for pattern in case.patterns:
        assert re.search(pattern, message), (
            f"{case.name}: {pattern!r} is not in the message of {type(raised.value).__name__}: {message}")


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case):
    assert not dist.is_initialized()
    check_case(case)


# --- cases that need a group of two --------------------------------------------------------------

def two_rank_cases(rank: int) -> list[Case]:
    left_out = dist.new_group([0])  # rank 1 is not in it
    destroyed = dist.new_group([0, 1])
    dist.destroy_process_group(destroyed)
    # Rank 1 shards one layer more than rank 0.
    different_plan = {"0": "colwise", "2": "rowwise"} if rank == 0 else {"0": "colwise", "2": "rowwise", "4": "colwise"}
    return [
        Case("ColumnParallelLinear/indivisible out_features", lambda: ColumnParallelLinear(4, 5), ValueError,
             ["ColumnParallelLinear: out_features 5 is not divisible by the group size 2; expected a multiple of 2"]),
        Case("scatter_to_tp/indivisible", lambda: torch_mp.scatter_to_tp(x(3, 4), 0), ValueError,
             ["torch_mp.scatter_to_tp: input size 3 along dim 0 is not divisible by the group size 2"]),
        Case("reduce_scatter_to_sp/indivisible", lambda: torch_mp.reduce_scatter_to_sp(x(2, 3), -1), ValueError,
             ["torch_mp.reduce_scatter_to_sp: input size 3 along dim -1 is not divisible by the group size 2"]),
        Case("row_parallel_linear/replicated input indivisible",
             lambda: torch_mp.row_parallel_linear(x(2, 5), x(6, 2), input_is_parallel=False), ValueError,
             ["torch_mp.row_parallel_linear: input size 5 along dim -1 is not divisible by the group size 2"]),
        Case("RowParallelLinear/whole input where a slice is expected", lambda: RowParallelLinear(4, 6)(x(2, 4)),
             ValueError, [r"row_parallel_linear: input has 4 features", r"weight has shape \[6, 2\]"]),
        Case("tensor_parallel/indivisible features", lambda: torch_mp.tensor_parallel(
             nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4)), plan={"0": "colwise", "2": "rowwise"}),
             ValueError, ["'0' \\(colwise\\) has 5 features to shard, not divisible by the group size 2"]),
        Case("tensor_parallel/plans differ across ranks", lambda: torch_mp.tensor_parallel(
             nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)]), plan=different_plan), ValueError,
             [r"tensor_parallel: ranks \[1\] resolved a different plan than rank 0",
              "expected the same model and plan on every rank"]),
        Case("copy_to_tp/destroyed group", lambda: torch_mp.copy_to_tp(x(), group=destroyed), ValueError,
             [r"copy_to_tp: no process group named '.*' is registered in this process \(never made, or destroyed\)"]),
        *([Case("reduce_from_tp/group without this rank", lambda: torch_mp.reduce_from_tp(x(), group=left_out),
                ValueError, [r"reduce_from_tp\(group=\.\.\.\): rank 1 is not a member of this group"])]
          if rank == 1 else []),
        Case("gather_from_tp/2-D mesh", lambda: torch_mp.gather_from_tp(
             x(), group=dist.device_mesh.init_device_mesh("cpu", (1, 2))), ValueError,
             [r"gather_from_tp\(group=\.\.\.\): a DeviceMesh with 2 dims; expected a 1-D mesh"]),
        Case("init_mesh/sizes do not multiply to the world", lambda: torch_mp.init_mesh(dp=3), ValueError,
             [r"init_mesh: dp=3 x tp=0 = 0 ranks but the world has 2; expected dp \* tp == world size"]),
    ]


def check_two_rank_cases(rank, world):
    for case in two_rank_cases(rank):
        check_case(case)


def test_bad_input_on_two_ranks():
    run_ranks(2, check_two_rank_cases, timeout=120)


# --- zero-size batches work ----------------------------------------------------------------------

def check_zero_size_batches(rank, world):
    torch.manual_seed(0)
    column, row = ColumnParallelLinear(4, 6), RowParallelLinear(6, 4)
    embedding = VocabParallelEmbedding(10, 4)
    for rows in (0, 3):  # an empty batch, then a full one through the same layers
        ids = torch.randint(0, 10, (rows,))
        inputs = embedding(ids).detach().requires_grad_()
        hidden = column(inputs)
        output = row(hidden)
        assert hidden.shape == (rows, 6 // world) and output.shape == (rows, 4)
        logits = ColumnParallelLinear(4, 10)(output)
        loss = vocab_parallel_cross_entropy(logits, ids, reduction="sum")
        loss.backward()
        assert inputs.grad.shape == (rows, 4)
        assert column.weight.grad.shape == column.weight.shape
        if rows == 0:
            assert loss.item() == 0 and not column.weight.grad.any() and not row.weight.grad.any()
        column.zero_grad(), row.zero_grad()
    for dim in (0, -1):
        empty = torch.empty(0, 2 * world, requires_grad=True)
        for op in (torch_mp.gather_from_tp, torch_mp.scatter_to_tp, torch_mp.reduce_scatter_to_sp,
                   torch_mp.gather_from_sp):
            out = op(empty, dim)
            out.sum().backward()
            assert out.numel() == 0 and empty.grad.shape == empty.shape
    model = torch_mp.tensor_parallel(mlp(), plan={"0": "colwise", "2": "rowwise", "4": "colwise", "6": "rowwise"})
    output = model(torch.empty(0, 16))
    assert output.shape == (0, 8)
    output.sum().backward()


@pytest.mark.parametrize("world", [1, 2])
def test_zero_size_batches(world):
    if world == 1:
        check_zero_size_batches(0, 1)
    else:
        run_ranks(2, check_zero_size_batches, timeout=120)
