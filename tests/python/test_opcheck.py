"""Every registered torch_mp operator under torch.library.opcheck, on Gloo groups of one and two ranks.

The table of samples is checked against the schemas libtorch_mp registers (the dispatcher's list of
torch_mp:: operators), both ways: an operator added in C++ without a sample here fails the test,
named, and so does a sample for an operator that no longer exists. Every schema must also carry
the pt2_compliant_tag (torch.compile traces it without graph breaks).
"""
import torch
import torch.distributed as dist
from torch.library import opcheck

import torch_mp  # noqa: F401  (registers torch.ops.torch_mp.*)
from distributed import run_ranks
from tensors import leaf

ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# column_parallel_linear's backward reduces the input gradient in place with the start/wait pair:
# opcheck's aot_eager run copies mutated tensors instead of reinplacing them, which the wait refuses
# with an error (test_async_collectives checks that); inductor reinplaces them.
NOT_UNDER_AOT_EAGER = ("test_schema", "test_autograd_registration", "test_faketensor")


def samples(group_name, world, rank):
    """{operator name: [(args, opcheck test_utils), ...]} for a group of `world` ranks named `group_name`."""
    group = (group_name, world)
    x = torch.randn(world * 2, 3)
    w = torch.randn(3, 3)
    b = torch.randn(3)
    rows = [2] * world
    linear_utils = ALL_UTILS if world == 1 else NOT_UNDER_AOT_EAGER
    return {
        "to_device": [((leaf(x), torch.device("cpu"), False), ALL_UTILS)],
        "copy_to_tp": [((leaf(x), *group), ALL_UTILS)],
        "reduce_from_tp": [((leaf(x), *group), ALL_UTILS)],
        "gather_from_tp": [((leaf(x), -1, *group), ALL_UTILS)],
        "scatter_to_tp": [((leaf(x), 0, *group), ALL_UTILS)],
        "reduce_scatter_to_sp": [((leaf(x), 0, *group), ALL_UTILS)],
        "gather_from_sp": [((leaf(x), 0, *group), ALL_UTILS)],
        "column_parallel_linear": [
            ((leaf(x), leaf(w), leaf(b), True, *group), linear_utils),
            ((leaf(x), leaf(w), None, False, *group), linear_utils),
        ],
        "_row_parallel_linear": [((leaf(x), leaf(w), leaf(b), *group), ALL_UTILS)],
        "row_parallel_linear": [
            ((leaf(x), leaf(w), leaf(b), True, *group), ALL_UTILS),
            ((leaf(torch.randn(4, 3 * world)), leaf(w), None, False, *group), ALL_UTILS),
        ],
        "vocab_parallel_embedding": [
            ((torch.randint(0, 4 * world, (5,)), leaf(torch.randn(4, 3)), rank * 4, *group), ALL_UTILS)],
        "vocab_parallel_cross_entropy": [
            ((leaf(torch.randn(5, 4)), torch.randint(0, 4 * world, (5,)), rank * 4, -100, *group), ALL_UTILS)],
        "all_to_all": [((leaf(x), rows, rows, *group), ALL_UTILS)],
        "_all_to_all": [((x, rows, rows, *group), ALL_UTILS)],
        "_all_reduce": [((x, "max", *group), ALL_UTILS)],
        "_all_gather": [((x, 0, *group), ALL_UTILS)],
        "_reduce_scatter": [((x, 0, *group), ALL_UTILS)],
        "_shard": [((x, 0, *group), ALL_UTILS)],
        # opcheck runs an op several times: a started all-reduce would never be waited on. Across
        # ranks the pair is checked in test_async_collectives; here in a group of one (no collective).
        # Async TP: a sequence-parallel input of 2 rows per rank; [2 * world, 3] in for the reduce-scatter.
        "all_gather_matmul": [((leaf(torch.randn(2, 3)), [leaf(w), leaf(torch.randn(2, 3))], 0, 1, *group), ALL_UTILS),
                              ((leaf(torch.randn(2, 4, 3)), [leaf(w)], 1, 2, *group), ALL_UTILS)],
        "matmul_reduce_scatter": [((leaf(x), leaf(torch.randn(4, 3)), 0, 1, *group), ALL_UTILS),
                                  ((leaf(torch.randn(3, 4 * world, 3)), leaf(w), 1, 2, *group), ALL_UTILS)],
        "_matmul_reduce_scatter": [(([x, x], [w, w], torch.randn(world * 2, 3), 0, 1, *group), ALL_UTILS),
                                   (([x], [w], None, 0, 2, *group), ALL_UTILS)],
        # slot -1: the whole backward at once (a queued weight gradient would outlive opcheck's runs).
        "deferred_linear": [((leaf(x), leaf(w), leaf(b), -1), ALL_UTILS), ((leaf(x), leaf(w), None, -1), ALL_UTILS)],
        "_all_reduce_start_": [((torch.randn(3), "sum", "", 1), ALL_UTILS)],
        "_wait_": [((torch.randn(3), [torch.randn(2)], "", 1), ALL_UTILS)],
    }


def registered_ops():
    """The torch_mp operators the dispatcher knows, as {name: default overload}."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("torch_mp::"))
    overloads = [name.removeprefix("torch_mp::") for name in names]
    assert all("." not in name for name in overloads), f"torch_mp operators with named overloads: {overloads}"
    return {name: getattr(torch.ops.torch_mp, name).default for name in overloads}


def test_every_registered_op_has_a_sample_and_the_pt2_tag():
    ops = registered_ops()
    table = samples("", 1, 0)
    assert not sorted(set(ops) - set(table)), (
        f"torch_mp operators without an opcheck sample: {sorted(set(ops) - set(table))}; add them to "
        "samples() in tests/python/test_opcheck.py")
    assert not sorted(set(table) - set(ops)), (
        f"opcheck samples for operators that are not registered: {sorted(set(table) - set(ops))}")
    untagged = sorted(name for name, op in ops.items() if torch.Tag.pt2_compliant_tag not in op.tags)
    assert not untagged, f"torch_mp schemas without the pt2_compliant_tag: {untagged}"


def opcheck_every_op(group_name, world, rank):
    ops = registered_ops()
    for name, cases in samples(group_name, world, rank).items():
        for args, utils in cases:
            opcheck(ops[name], args, test_utils=utils)


def check_every_op(rank, world):
    opcheck_every_op(dist.group.WORLD.group_name, world, rank)


def test_opcheck_every_op_without_a_process_group():
    opcheck_every_op("", 1, 0)


def test_opcheck_every_op_on_one_gloo_rank():
    run_ranks(1, check_every_op)


def test_opcheck_every_op_on_two_gloo_ranks():
    run_ranks(2, check_every_op)


# Under autocast (csrc/ops/autocast.cpp): the matmuls run in the autocast dtype as aten::linear does,
# the cross entropy in float32 as aten::cross_entropy_loss does, the others in what arrives.
LOWER_PRECISION = {"column_parallel_linear", "row_parallel_linear", "_row_parallel_linear", "deferred_linear",
                   "all_gather_matmul", "matmul_reduce_scatter", "_matmul_reduce_scatter"}
FLOAT32 = {"vocab_parallel_cross_entropy"}


def cast_floats(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(v, dtype) for v in value)
    return value


def assert_same_outputs(actual, expected, name):
    actual, expected = ([t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
                        for out in (actual, expected))
    assert len(actual) == len(expected), name
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype, (name, a.dtype, e.dtype)
        assert torch.equal(a, e), name


def test_every_op_under_autocast_gives_what_aten_linear_would():
    ops = registered_ops()
    undeclared = sorted({name for name in ops for key in ("AutocastCPU", "AutocastCUDA")
                         if not torch._C._dispatch_has_kernel_for_dispatch_key(f"torch_mp::{name}", key)})
    assert not undeclared, f"torch_mp operators without an autocast kernel (csrc/ops/autocast.cpp): {undeclared}"
    for dtype in (torch.bfloat16, torch.float16):
        for name, cases in samples("", 1, 0).items():
            for args, _ in cases:
                args = cast_floats(args, torch.float32)
                with torch.autocast("cpu", dtype):
                    actual = ops[name](*args)
                policy = dtype if name in LOWER_PRECISION else torch.float32
                expected = ops[name](*cast_floats(args, policy))
                assert_same_outputs(actual, expected, f"{name} under {dtype} autocast")
                if name not in LOWER_PRECISION | FLOAT32:  # what arrives in low precision stays so
                    with torch.autocast("cpu", dtype):
                        actual = ops[name](*cast_floats(args, dtype))
                    assert_same_outputs(actual, ops[name](*cast_floats(args, dtype)), f"{name} given {dtype}")
