"""Launch to window: how long `python main.py gui` takes until its window is first painted, against a
bare `python -c "import PySide6.QtWidgets"` on the same machine, as a ratio in one run.

Three commands, run N times alternating so machine noise hits each alike:

    import PySide6.QtWidgets   python -c "import PySide6.QtWidgets"; time to exit (the reference)
    bare Qt window             a QApplication and an empty QWidget, until its first paint
    main.py gui                the app, until the main window's first paint (VIDEO_TRAINER_EXIT_WHEN_SHOWN=1
                               makes it print a line then and exit; see gui/app.py)

The two windows are timed from the start of the process to the moment this script reads the
child's "window shown" line (its exit is not waited for). The app runs with an empty per-user
folder (defaults, no window state), as on a first start.

    python benchmarks/gui_launch.py [--runs 11] [--preset NAME] [--compare CHECKOUT]

--compare adds another checkout's `main.py gui` (for example the main branch beside a feature
branch) to the same alternation, so that a few milliseconds between the two are not lost in the
drift between two separate runs.

Offscreen unless a display is set (`xvfb-run -a python benchmarks/gui_launch.py` includes a real X
server's window mapping and painting).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHOWN = "window shown"
BARE_WINDOW = f"""
import sys
from PySide6.QtCore import QEvent, QObject, QTimer
from PySide6.QtWidgets import QApplication, QWidget
app = QApplication(sys.argv[:1])
window = QWidget()
window.resize(1120, 800)
class FirstPaint(QObject):
    def eventFilter(self, watched, event):
        if event.type() == QEvent.Type.Paint:
            window.removeEventFilter(self)
            QTimer.singleShot(0, shown)
        return False
def shown():
    print({SHOWN!r}, flush=True)
    app.quit()
window.installEventFilter(FirstPaint(window))
window.show()
app.exec()
"""


def time_until_exit(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_until_shown(command: list[str], env: dict[str, str], cwd: Path = ROOT) -> float:
    start = time.perf_counter()
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=cwd) as child:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(SHOWN):
                seconds = time.perf_counter() - start
                break
        else:
            raise SystemExit(f"{command[1:]} ended without showing a window (exit code {child.wait()})")
        child.wait(timeout=60)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--preset", help="open the window with this preset (default: none, as a first start)")
    parser.add_argument("--compare", type=Path, metavar="CHECKOUT", help="also time this checkout's main.py gui, alternating")
    args = parser.parse_args()

    env = dict(os.environ)
    if not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
        env.setdefault("QT_QPA_PLATFORM", "offscreen")
    app_env = {**env, "VIDEO_TRAINER_EXIT_WHEN_SHOWN": "1"}
    gui = [sys.executable, str(ROOT / "main.py"), "gui"] + (["--preset", args.preset] if args.preset else [])
    commands = {
        "import PySide6.QtWidgets": lambda: time_until_exit([sys.executable, "-c", "import PySide6.QtWidgets"], env),
        "bare Qt window": lambda: time_until_shown([sys.executable, "-c", BARE_WINDOW], env),
        "main.py gui": lambda: time_until_shown(gui, {**app_env, "VIDEO_TRAINER_HOME": tempfile.mkdtemp(prefix="vt-launch-")}),
    }
    if args.compare is not None:
        other = args.compare.resolve()
        other_gui = [sys.executable, str(other / "main.py"), *gui[2:]]
        commands[f"main.py gui in {other.name}"[:28]] = lambda: time_until_shown(
            other_gui, {**app_env, "VIDEO_TRAINER_HOME": tempfile.mkdtemp(prefix="vt-launch-")}, cwd=other
        )
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, run in commands.items():  # alternating: drift hits every command alike
            times[name].append(run())
    load_after = os.getloadavg()[0]

    import PySide6

    print(
        f"{args.runs} runs each; Qt platform {env.get('QT_QPA_PLATFORM') or 'xcb'}; PySide6 {PySide6.__version__}; "
        f"Python {platform.python_version()}; {os.cpu_count()} CPUs; load average (1 min) before {load_before:.2f}, after {load_after:.2f}"
    )
    reference = statistics.median(times["import PySide6.QtWidgets"])
    print(f"{'command':28} {'median s':>9} {'min s':>7} {'max s':>7} {'x reference':>12}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:28} {median:9.3f} {min(samples):7.3f} {max(samples):7.3f} {median / reference:12.2f}")


if __name__ == "__main__":
    main()
