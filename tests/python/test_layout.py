"""The package's layout keeps its promises (README, "Layout"): the public surface is torch_mp/__init__.py
and torch_mp.nn, every other module is private, modules import each other without cycles, and no
module reaches for the private names of another subpackage."""
import ast
import pathlib

import torch_mp

PACKAGE = pathlib.Path(torch_mp.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_module(name: str) -> bool:
    return name in MODULES or name == "torch_mp._C"


def _imports(module: str):
    """(imported module, names imported from it, line) for every import of a torch_mp module in
    ``module``, at any depth (imports inside functions count: they run too)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torch_mp"):
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("torch_mp"):
                yield base, [alias.name for alias in node.names], node.lineno


def _edges(module: str):
    """The modules ``module`` needs loaded: ``from pkg import sub`` needs pkg.sub (pkg's __init__
    is loaded already whenever a module below it runs)."""
    for base, names, _ in _imports(module):
        submodules = [f"{base}.{name}" for name in names if _is_module(f"{base}.{name}")]
        for target in submodules or [base]:
            if target in MODULES and target != module:
                yield target


def test_no_import_cycles():
    graph = {module: set(_edges(module)) - {"torch_mp"} for module in MODULES}
    cycles, state, stack = [], {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _area(module: str) -> str:
    """The subpackage a module belongs to (``torch_mp._pipelining``), or the module itself."""
    return ".".join(module.split(".")[:2])


def test_no_private_names_imported_across_subpackages():
    found = [f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {name} from {base}"
             for module in MODULES for base, names, line in _imports(module) for name in names
             if name.startswith("_") and not _is_module(f"{base}.{name}") and _area(base) != _area(module)]
    assert not found, "private names imported from another subpackage:\n" + "\n".join(found)


def test_public_surface_is_the_package_and_nn():
    public_modules = sorted(module for module in MODULES
                            if any(not part.startswith("_") for part in module.split(".")[1:2]))
    assert public_modules == ["torch_mp.nn", "torch_mp.nn.attention", "torch_mp.nn.layers"]
    hidden = [name for name in torch_mp.__all__ if f"torch_mp.{name}" in MODULES and callable(getattr(torch_mp, name))]
    assert not hidden, f"public functions hiding a module of the same name: {hidden}"
    for name in torch_mp.__all__:
        assert hasattr(torch_mp, name), name
