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


# --- the position-kind protocol: only the kinds' own modules know the kinds ------------------------

# The built-in kinds' modules (each defines one layer class and registers it, nn/registry.py).
KIND_MODULES = ("sparse_delta_linear", "row_sparse_linear", "block_sparse_linear", "pst_linear")
KIND_CLASSES = ("SparseDeltaLinear", "RowSparseLinear", "BlockSparseLinear", "PSTLinear")
KIND_NAMES = ("entries", "rows", "blocks", "pst")
# Folders that must ask the registry and the layer instead of naming a kind.
ASKING_FOLDERS = ("masks", "integration", "bench")


def _is_kind_module(name: str) -> bool:
    return name.split(".")[:3] in (["spft_kernels", "nn", m] for m in KIND_MODULES)


def _names_a_kind_class(node) -> bool:
    """``SparseDeltaLinear`` or ``anything.SparseDeltaLinear`` (``spft.SparseDeltaLinear``)."""
    if isinstance(node, ast.Name):
        return node.id in KIND_CLASSES
    if isinstance(node, ast.Attribute):
        return node.attr in KIND_CLASSES
    if isinstance(node, ast.Tuple):
        return any(_names_a_kind_class(element) for element in node.elts)
    return False


def _names_kind(node) -> bool:
    """``kind``, ``x.kind``, ``record.kind``: what holds a kind's name."""
    return (isinstance(node, ast.Name) and node.id == "kind") or (isinstance(node, ast.Attribute) and node.attr == "kind")


def _is_kind_string(node) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in KIND_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_kind_string(element) for element in node.elts)
    return False


def kind_branches(source: str, filename: str = "<source>") -> list:
    """``(line, what)`` of every place in ``source`` that branches on a concrete layer class or a
    kind's name: ``isinstance``/``issubclass``/``type(x) is`` with a kind class, a comparison of
    ``kind``/``x.kind`` with a kind's name, a lookup table keyed by kind classes or names."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass"):
            if len(node.args) == 2 and _names_a_kind_class(node.args[1]):
                found.append((node.lineno, f"{node.func.id} with a concrete layer class"))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(op, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq)) for op in node.ops) and any(
                _names_a_kind_class(side) for side in sides
            ):
                found.append((node.lineno, "a comparison with a concrete layer class"))
            if any(_names_kind(side) for side in sides) and any(_is_kind_string(side) for side in sides):
                found.append((node.lineno, "a comparison of a kind with a kind's name"))
        elif isinstance(node, ast.Dict):
            # "pst" names a method as well as a kind (a table of methods is fine), so a table of
            # names counts when it holds two kinds that are not methods.
            named = {key.value for key in node.keys if isinstance(key, ast.Constant)} & {"entries", "rows", "blocks"}
            if any(key is not None and _names_a_kind_class(key) for key in node.keys) or len(named) >= 2:
                found.append((node.lineno, "a table keyed by kind classes or names"))
    return found


def test_masks_integration_and_bench_never_branch_on_a_kind():
    """A new kind is one file: everything outside the kinds' own modules asks the layer and the
    registry (``docs/architecture.md``), so no module in masks/, integration/ or bench/ may branch
    on a concrete layer class or on a kind's name, and masks/ and integration/ do not import the
    kinds' modules at all (bench/ builds layers of each kind for its providers)."""
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        folder = _folder(_module_name(path))
        if folder not in ASKING_FOLDERS:
            continue
        where = path.relative_to(PACKAGE)
        for line, what in kind_branches(path.read_text(), str(path)):
            wrong.append(f"{where}:{line}: {what}")
        if folder != "bench":
            for line, target in _imports(path):
                if _is_kind_module(target):
                    wrong.append(f"{where}:{line}: imports the kind module {target}")
    assert wrong == [], "\n".join(wrong)


@pytest.mark.parametrize("code", [
    "if isinstance(layer, PSTLinear): pass",
    "ok = isinstance(layer, (nn.Linear, spft.BlockSparseLinear))",
    "if type(layer) is RowSparseLinear: pass",
    "if record.kind == 'pst': pass",
    "if kind in ('entries', 'blocks'): pass",
    "TABLE = {SparseDeltaLinear: 1}",
    "TABLE = {'rows': 2, 'entries': 1}",
])
def test_the_kind_rule_catches_each_form(code):
    assert kind_branches(code)


@pytest.mark.parametrize("code", [
    "if config.method == 'pst': pass",  # a method, not a kind
    "layer = SparseDeltaLinear.from_linear(linear, index)",  # building one (bench's providers)
    "if layer.writes_w0: pass",
    "METHODS = {'speft': 1, 'pst': 2}",  # methods
])
def test_the_kind_rule_lets_protocol_use_pass(code):
    assert kind_branches(code) == []


def _module_graph() -> dict:
    """``{module: {modules it imports}}`` inside the package (imports anywhere in the file; a
    ``from package import name`` counts as importing the submodule ``name`` when it is one)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        targets = set()
        for _, name in _imports(path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _cycles(graph: dict) -> list:
    """Every strongly connected set of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_between_modules():
    """No two modules import each other, directly or round a circle, wherever the import sits (an
    import inside a function to dodge a circle is still a circle). Package ``__init__`` files only
    re-export, so their edges are left out."""
    graph = {m: {t for t in targets if not (PACKAGE / (t.replace("spft_kernels.", "").replace(".", "/")) / "__init__.py").exists()}
             for m, targets in _module_graph().items()}
    assert _cycles(graph) == []


def test_the_circle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
