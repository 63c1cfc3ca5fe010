"""What `main.py gui` pays before its first paint that a bare Qt window does not, in one process each:

    python benchmarks/gui_paint_costs.py

- the `Qt` namespace: PySide makes the Python enums of a class when the class is first named, and
  `Qt` holds about 75 of them (Key alone 471 members); asking the system's colour scheme
  (`QStyleHints.colorScheme()`, which the theme does before the first paint) names it too;
- PySide's import hook: after `import PySide6`, every module named by an import statement for the
  first time has its source read (`shibokensupport.feature`, looking for `from __feature__`), so
  each module the window imports before its first paint costs a little more than its own import;
- the Qt classes named by the first paint (each one made by PySide then).

The second and third are counted for benchmarks/gui_launch.py's bare window and for `main.py gui`
as it times it (VIDEO_TRAINER_EXIT_WHEN_SHOWN, an empty per-user folder), with the hook's check timed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

QT_NAMESPACE = """
import time
from PySide6 import QtCore, QtGui, QtWidgets
app = QtWidgets.QApplication([])
start = time.perf_counter()
QtGui.QGuiApplication.styleHints().colorScheme()
print(f"colorScheme() in a fresh process, which makes the Qt namespace: {1000 * (time.perf_counter() - start):.1f} ms")
"""

HOOK = """
import builtins, os, runpy, sys, time
checked = []
real_import = builtins.__import__
def timing_import(*args, **kwargs):
    module = real_import(*args, **kwargs)
    feature = sys.modules.get("shibokensupport.feature")
    if feature is not None and hasattr(feature, "_mod_uses_pyside") and not hasattr(feature, "_timed"):
        check = feature._mod_uses_pyside
        def timed(mod):
            start = time.perf_counter()
            try:
                return check(mod)
            finally:
                checked.append(time.perf_counter() - start)
        feature._mod_uses_pyside, feature._timed = timed, True
    return module
builtins.__import__ = timing_import
write = sys.stdout.write
def shown(text):
    if text.startswith("window shown"):
        classes = [k for m in ("QtCore", "QtGui", "QtWidgets") for k in vars(sys.modules["PySide6." + m]) if k.startswith("Q")]
        write(f"PySide's import hook before the first paint: {len(checked)} modules checked, {1000 * sum(checked):.1f} ms\\n")
        write(f"modules loaded at the first paint: {len(sys.modules)}; Qt classes and functions made: {len(classes)}\\n")
    return write(text)
sys.stdout.write = shown
"""
APP = HOOK + """
sys.path.insert(0, os.getcwd())
sys.argv = ["main.py", "gui"]
runpy.run_path("main.py", run_name="__main__")
"""


def main() -> None:
    from gui_launch import BARE_WINDOW  # this folder's benchmark: the same bare window

    env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
    subprocess.run([sys.executable, "-c", QT_NAMESPACE], env=env, check=True)
    app_env = {**env, "VIDEO_TRAINER_EXIT_WHEN_SHOWN": "1", "VIDEO_TRAINER_HOME": tempfile.mkdtemp(prefix="vt-costs-")}
    for name, code, run_env in (("bare Qt window", HOOK + BARE_WINDOW, env), ("main.py gui", APP, app_env)):
        result = subprocess.run([sys.executable, "-c", code], env=run_env, cwd=ROOT, capture_output=True, text=True, check=True)
        for line in result.stdout.splitlines():
            if not line.startswith("window shown"):
                print(f"{name}: {line}")


if __name__ == "__main__":
    main()
