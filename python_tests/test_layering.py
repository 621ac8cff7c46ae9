"""The package's folders are its architecture: ops <- nn <- masks <- integration <- bench. Every
import inside the package is parsed (ast, nothing imported) and must point down that chain, so a
new op, layer, metric or integration feature cannot quietly make the layers depend on each other
the other way, and no two folders may import each other (a cycle)."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "spft_kernels"
# Lower index = lower layer; a module may import only its own folder and lower ones.
LAYERS = ("ops", "nn", "masks", "integration", "bench")


def _folder(module: str):
    """'spft_kernels.nn.base' -> 'nn'; the package's top level ('spft_kernels', its __init__) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _module_name(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path):
    """(line, absolute module name) of every import of the package in ``path``, wherever it sits
    (top level, inside functions, under TYPE_CHECKING)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
            for name in names:
                if name.split(".")[0] == "spft_kernels":
                    yield node.lineno, name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "spft_kernels":
                    yield node.lineno, alias.name


def _edges():
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _folder(_module_name(path))
        for line, target in _imports(path):
            yield path, line, source, target


def test_every_module_lives_in_a_layer_folder():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside the layer folders {LAYERS}: {loose}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders == sorted(LAYERS)


def test_imports_point_down_the_layers():
    wrong = []
    for path, line, source, target in _edges():
        if source is None:
            continue  # the package's __init__ re-exports the public API from every layer
        folder = _folder(target)
        if folder is None:
            if target.split(".")[:2] != ["spft_kernels", "_C"]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports the package top level ({target})")
            continue
        if LAYERS.index(folder) > LAYERS.index(source):
            wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({source}) imports {target} ({folder}), a higher layer")
    assert wrong == [], "\n".join(wrong)


def test_no_cycle_between_folders():
    graph = {layer: set() for layer in LAYERS}
    for _, _, source, target in _edges():
        folder = _folder(target)
        if source is not None and folder is not None and folder != source:
            graph[source].add(folder)
    cycles = [(a, b) for a in graph for b in graph[a] if a in graph[b]]
    assert cycles == []


@pytest.mark.parametrize("source, target, expected", [
    ("ops", "spft_kernels.nn.base", False),
    ("nn", "spft_kernels.ops.index", True),
    ("masks", "spft_kernels.integration.config", False),
    ("bench", "spft_kernels.integration.surgery", True),
])
def test_the_rule_itself_can_fail(source, target, expected):
    """The check above would catch an upward import (guards against a rule that passes vacuously)."""
    assert (LAYERS.index(_folder(target)) <= LAYERS.index(source)) is expected


def test_relative_imports_resolve_to_absolute_names(tmp_path, monkeypatch):
    module = PACKAGE / "nn" / "base.py"
    names = {name for _, name in _imports(module)}
    assert "spft_kernels.ops.backends" in names
    assert all(name.startswith("spft_kernels.") for name in names)


def test_import_stays_lean():
    """``import spft_kernels`` initialises no CUDA and imports neither transformers nor peft."""
    code = (
        "import sys, torch, spft_kernels\n"
        "heavy = [m for m in ('transformers', 'peft', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
