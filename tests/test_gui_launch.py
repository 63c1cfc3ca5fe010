"""Start-up in a fresh process: the first-show hook the launch benchmark uses, the benchmark itself,
and the window at 200% scaling (QT_SCALE_FACTOR=2)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = "#demo tiny wan LoRA"


def run(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "VIDEO_TRAINER_HOME": str(home), **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120, check=False)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_exit_when_shown_prints_once_the_window_is_painted(tmp_path: Path) -> None:
    result = run(["main.py", "gui"], tmp_path / "home", VIDEO_TRAINER_EXIT_WHEN_SHOWN="1")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("window shown ")]
    assert len(lines) == 1 and float(lines[0].split()[-1]) > 0
    assert (tmp_path / "home" / "state" / "window.ini").is_file()  # closed as a user would close it


def test_launch_benchmark_reports_the_ratio(tmp_path: Path) -> None:
    result = run(["benchmarks/gui_launch.py", "--runs", "1"], tmp_path / "home")
    assert result.returncode == 0, result.stderr
    rows = {line.split("  ")[0].strip(): line.split() for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"import PySide6.QtWidgets", "bare Qt window", "main.py gui"}
    # The report's form, not its times (timed assertions are not allowed: one run under load can go either way).
    assert float(rows["import PySide6.QtWidgets"][-1]) == 1.0 and float(rows["main.py gui"][-1]) > 0


def test_paint_costs_benchmark_counts_both_windows(tmp_path: Path) -> None:
    result = run(["benchmarks/gui_paint_costs.py"], tmp_path / "home")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("colorScheme() in a fresh process") and lines[0].endswith(" ms")
    for name in ("bare Qt window", "main.py gui"):
        assert any(line.startswith(f"{name}: PySide's import hook before the first paint: ") for line in lines), lines
        assert any(line.startswith(f"{name}: modules loaded at the first paint: ") for line in lines), lines


def test_window_builds_at_200_percent(tmp_path: Path) -> None:
    """QT_SCALE_FACTOR=2: the same window in twice the pixels, the doctor's report (tables) included."""
    from gui.main_window import DEFAULT_SIZE

    shot = tmp_path / "x2.png"
    result = run(["main.py", "gui", "--preset", DEMO, "--tab", "data", "--screenshot", str(shot)], tmp_path / "home", QT_SCALE_FACTOR="2")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert png_size(shot) == (2 * DEFAULT_SIZE[0], 2 * DEFAULT_SIZE[1])
