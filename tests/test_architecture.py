"""The layout's promises: core/ never imports Qt, the CLI's light commands stay light, the layers
import only downward and never in a circle, and the shared engine names no model family.

The layers, bottom up (docs/architecture.md, "Layers"): each may import only its own and lower ones.
Every import counts: at module level, inside functions (lazy imports) and under TYPE_CHECKING. A
TYPE_CHECKING import makes no runtime circle, but a lower layer that names a higher layer's type
depends on it all the same; where a lower layer needs only the shape of a thing, it names a Protocol
or the interface below it. Importing a.b.c also runs a/__init__ and a/b/__init__; those implicit
parent imports are not edges (a package's __init__ importing its own modules would otherwise always
be a circle).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("core", "core.paths", "core.errors", "core.atomic", "core.log_setup", "core.identity", "core.model_folder")),
    ("config", ("core.config",)),
    ("export", ("core.export",)),
    ("memory", ("core.memory",)),
    ("models", ("core.models",)),
    ("data", ("core.data",)),
    ("train", ("core.train",)),
    ("cli", ("core.cli",)),
    ("gui", ("gui",)),
)

# A model family's name: Wan as a word or a prefix (Wan2.2, wan21, WanPipeline, WAN_2_1, comfy_wan), not
# inside another word (want, swan, wand); the variant names A14B and TI2V; the other families' names.
FAMILY_NAME = re.compile(r"(?<![A-Za-z])(?:wan|Wan|WAN)(?![a-z])|(?i:cogvideo|hunyuan|hidream|a14b|ti2v)")
# Where the shared engine may name a family: the table of known model sizes, one LoRA key map per family.
NEUTRAL_PACKAGES = ("core/train", "core/data", "core/memory", "core/export")
# The tables that hold one family's facts for the shared code to look up by class: sizes and layouts
# (a family's VAE formula included), and ComfyUI's key names.
FAMILY_TABLES = ("core/memory/known_models.py", "core/memory/model_sizes.py", "core/memory/*_vae_sizes.py",
                 "core/export/comfy_*.py")

QT_MODULES = ("PySide6", "PyQt5", "PyQt6", "pyqtgraph", "shiboken6")


def _imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_under_core_imports_qt() -> None:
    offenders = []
    files = sorted((ROOT / "core").rglob("*.py"))
    assert len(files) > 10  # the scan really walks core/
    for file in files:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for name in _imported_modules(tree):
            if name.split(".")[0] in QT_MODULES or name == "gui" or name.startswith("gui."):
                offenders.append(f"{file.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_importing_all_of_core_loads_no_qt() -> None:
    # Catches indirect imports that the source scan cannot see.
    code = (
        "import importlib, pkgutil, sys, core\n"
        "for m in pkgutil.walk_packages(core.__path__, 'core.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {QT_MODULES!r}]\n"
        "print(len([m for m in sys.modules if m.startswith('core.')]), bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_presets_command_does_not_import_torch() -> None:
    code = (
        "import sys; sys.argv = ['main.py', 'presets', 'list']\n"
        "import main\n"
        "rc = main.main(['presets', 'list'])\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().endswith("NO-TORCH"), result.stdout + result.stderr


# -- the import graph --------------------------------------------------------------------------------
def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(root: Path = ROOT) -> dict[str, Path]:
    files = sorted([*(root / "core").rglob("*.py"), *(root / "gui").rglob("*.py")])
    return {_module_name(file, root): file for file in files}


def _imports(name: str, file: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import statement in the file, wherever it stands."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno))
    return found


def _graph(root: Path = ROOT) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    """Our modules' files, and module -> {imported module: first line importing it}."""
    sources = _sources(root)
    graph: dict[str, dict[str, int]] = {}
    for name, file in sources.items():
        edges: dict[str, int] = {}
        for target, line in _imports(name, file, set(sources)):
            edges.setdefault(target, line)
        graph[name] = edges
    return sources, graph


def _circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (layer, length of the matching prefix)
    for level, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "core" and module.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > best[1]):
                best = (level, len(prefix))
    return None if best is None else best[0]


def _where(sources: dict[str, Path], module: str, line: int) -> str:
    return f"{sources[module].relative_to(ROOT).as_posix()}:{line}"


def test_every_module_has_a_layer() -> None:
    sources, _ = _graph()
    assert len(sources) > 100  # the scan really walks core/ and gui/
    assert [m for m in sources if _layer(m) is None] == []


def test_no_import_circles() -> None:
    sources, graph = _graph()
    described = []
    for component in _circles(graph):
        members = set(component)
        edges = [f"{_where(sources, a, line)} imports {b}" for a in component for b, line in graph[a].items() if b in members]
        described.append(" <-> ".join(component) + ": " + "; ".join(edges))
    assert described == []


def test_no_import_from_a_lower_layer_into_a_higher_one() -> None:
    sources, graph = _graph()
    names = [layer for layer, _ in LAYERS]
    upward = [
        f"{_where(sources, a, line)} imports {b} ({names[_layer(a)]} may not import {names[_layer(b)]})"
        for a, edges in graph.items() for b, line in edges.items()
        if _layer(b) > _layer(a)  # type: ignore[operator]
    ]
    assert upward == []


def test_the_graph_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "core" / "memory"
    pkg.mkdir(parents=True)
    (tmp_path / "gui").mkdir()
    for folder in (tmp_path / "core", pkg, tmp_path / "core" / "train", tmp_path / "gui"):
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").write_text("")
    (tmp_path / "core" / "train" / "run.py").write_text("from core.memory import low\n")
    (pkg / "low.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..train.run import X\n"
        "def f():\n    from . import other\n"
    )
    (pkg / "other.py").write_text("import core.memory.low\n")
    _, graph = _graph(tmp_path)
    assert graph["core.memory.low"] == {"core.train.run": 3, "core.memory.other": 5}
    assert graph["core.train.run"] == {"core.memory.low": 1}
    assert _circles(graph) == [["core.memory.low", "core.memory.other", "core.train.run"]]


# -- no family names in the shared engine ------------------------------------------------------------
@pytest.mark.parametrize("text, names_a_family", [
    ("Wan 2.2 A14B", True), ("wan21", True), ("Wan2.1", True), ("WanPipeline", True), ("WAN_2_1", True),
    ("comfy_wan", True), ("CogVideoX", True), ("HunyuanVideo", True), ("hidream", True), ("TI2V-5B", True),
    ("want", False), ("swan", False), ("wand", False), ("Wanted", False), ("rowan", False), ("wane", False),
])
def test_the_family_pattern(text: str, names_a_family: bool) -> None:
    assert bool(FAMILY_NAME.search(text)) == names_a_family


def test_train_data_memory_and_export_name_no_model_family() -> None:
    allowed = {file for pattern in FAMILY_TABLES for file in ROOT.glob(pattern)}
    files = [file for package in NEUTRAL_PACKAGES for file in sorted((ROOT / package).rglob("*.py")) if file not in allowed]
    assert len(files) > 50 and len(allowed) >= 3
    named = []
    for file in files:  # identifiers, strings, comments and docstrings alike
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            match = FAMILY_NAME.search(line)
            if match:
                named.append(f"{file.relative_to(ROOT).as_posix()}:{number} names {match.group(0)!r}: {line.strip()[:100]}")
    assert named == []
