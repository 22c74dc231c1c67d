"""Every public name has a docstring that says what a caller needs (README, "Layout"; issue 13 item 4):
the errors it raises, shapes for what takes tensors, the forward/backward pair for the operators, and
a page in the API reference (docs/)."""
import inspect
import pathlib

import pytest

import torch_mp
import torch_mp.nn

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
NOT_CALLABLE = {"cmake_prefix_path", "nn"}
PUBLIC = [(torch_mp, name) for name in torch_mp.__all__ if name not in NOT_CALLABLE] + \
         [(torch_mp.nn, name) for name in torch_mp.nn.__all__]
# Operators and layers: a forward/backward pair and shapes ("[..., n] -> [...]").
OPERATORS = {"to_device", "copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp", "reduce_scatter_to_sp",
             "gather_from_sp", "column_parallel_linear", "row_parallel_linear", "all_to_all", "all_gather_matmul",
             "matmul_reduce_scatter",
             "vocab_parallel_cross_entropy", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
             "TensorParallelMultiheadAttention"}


def _doc(module, name: str) -> str:
    return inspect.getdoc(getattr(module, name)) or ""


@pytest.mark.parametrize("module, name", PUBLIC, ids=[f"{m.__name__}.{n}" for m, n in PUBLIC])
def test_public_docstring_names_errors_and_appears_in_the_reference(module, name):
    doc = _doc(module, name)
    if isinstance(getattr(module, name), type) and issubclass(getattr(module, name), Exception):
        assert len(doc) > 50, name  # an exception: what it means (its message names the rest)
    else:
        assert len(doc) > 200, f"{module.__name__}.{name}: a docstring of {len(doc)} characters"
        assert "Raises" in doc, f"{module.__name__}.{name}: its docstring says no error it raises"
    documented = " ".join(path.read_text() for path in DOCS.glob("*.rst"))
    assert f"{module.__name__}.{name}" in documented, f"{module.__name__}.{name} is on no page of docs/"


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operator_docstring_gives_shapes_and_the_forward_backward_pair(name):
    module = torch_mp.nn if name in torch_mp.nn.__all__ else torch_mp
    doc = _doc(module, name)
    assert "forward:" in doc and "backward:" in doc, name
    assert "->" in doc and "[" in doc, f"{name}: no shapes"
