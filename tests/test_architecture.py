"""The layout's promises: core/ never imports Qt, and the CLI's light commands stay light."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

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
