"""The code's shape: the package's import graph runs one way (a module imports only from its own
layer or lower), and no function is longer than a screen.

    commands -> tune -> train, pretrain, infer -> eval, viz -> backend
             -> data, model, pseudo -> modes, config, runtime
             -> storage, console, errors, killpoints

Every ``import`` / ``from ... import`` of ``gtms`` modules counts, also those inside functions
(an import deferred for speed is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gtms"

# Lowest first. A module belongs to the longest prefix listed.
LAYERS = (
    ("gtms", "gtms.errors", "gtms.storage", "gtms.console", "gtms.killpoints"),
    ("gtms.modes", "gtms.config", "gtms.runtime"),
    ("gtms.data", "gtms.model", "gtms.pseudo"),
    ("gtms.backend", "gtms.tracking"),
    ("gtms.eval", "gtms.viz"),
    ("gtms.train", "gtms.pretrain", "gtms.infer"),
    ("gtms.tune",),
    ("gtms.commands",),
)


def layer_of(module: str) -> int:
    best, found = -1, None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), index
    if found is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return found


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, package: Path = PACKAGE) -> set[str]:
    """The ``gtms`` modules ``path`` imports (``from gtms import console`` -> gtms.console)."""
    name = module_name(path, package)
    here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "gtms")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[:len(here.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "gtms":
                continue
            for alias in node.names:   # `from gtms.data import shards` imports a module
                sub = f"{target}.{alias.name}"
                where = package.parent / Path(*sub.split("."))
                is_module = where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()
                out.add(sub if is_module else target)
    return out


def upward_imports(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, package)
        for target in sorted(imported_modules(path, package)):
            if layer_of(target) > layer_of(name):
                found.append(f"{name} (layer {layer_of(name)}) imports {target} "
                             f"(layer {layer_of(target)})")
    return found


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports() == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk itself, on a small package: a deferred import inside a function and a
    ``from package import module`` are found and judged; a downward import is fine."""
    package = tmp_path / "gtms"
    for folder in ("data", "train"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "train" / "loop.py").write_text("from gtms.data import reading\n")
    (package / "data" / "reading.py").write_text(
        "import numpy\n\ndef f():\n    from gtms.train.loop import train_loop\n")
    (package / "data" / "other.py").write_text("from gtms import train\n")
    assert upward_imports(package) == [
        "gtms.data.other (layer 2) imports gtms.train (layer 5)",
        "gtms.data.reading (layer 2) imports gtms.train.loop (layer 5)"]
    assert imported_modules(package / "train" / "loop.py", package) == {"gtms.data.reading"}


@pytest.mark.parametrize("module, layer", [("gtms.console", 0), ("gtms.config", 1),
                                           ("gtms.data.pipeline", 2), ("gtms.eval.metrics", 4),
                                           ("gtms.commands.train", 7)])
def test_layer_of(module, layer):
    assert layer_of(module) == layer


MAX_FUNCTION_LINES = 50


def long_functions(package: Path = PACKAGE) -> list[str]:
    """Functions longer than :data:`MAX_FUNCTION_LINES` (first decorator to last line); numba
    kernels (``@numba.njit``) are exempt: splitting them costs speed."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            decorators = [ast.unparse(d) for d in node.decorator_list]
            if any(d.startswith(("numba.njit", "njit")) for d in decorators):
                continue
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            length = node.end_lineno - start + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{module_name(path, package)}.{node.name}: {length} lines")
    return found


def test_no_function_is_longer_than_50_lines(tmp_path):
    assert long_functions() == []
    package = tmp_path / "gtms"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(50))
    (package / "long.py").write_text(f"def f():\n{body}\n\n\n@numba.njit\ndef g():\n{body}\n")
    assert long_functions(package) == ["gtms.long.f: 51 lines"]
