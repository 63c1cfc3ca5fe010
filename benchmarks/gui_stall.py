"""How long the window's event loop stalls while the tiny model trains, against the window idle.

The real window (gui.main_window.MainWindow with its run panel and plots) trains "#demo tiny wan
LoRA" in its worker thread while a 5 ms QTimer on the GUI thread records when it fires; a gap
between two ticks is time in which the window could not react (repaint, a click). Phases, in order:

    idle          the window shown, nothing running: the reference
    warm-up       the engine (torch, diffusers, peft, accelerate) imported in the background, as
                  the window does after it opens
    N preparing   Start pressed until the first step: the model loads, the caches fill (run 1)
                  or are found (later runs)
    N training    the first step to the end: metrics, plots, log and progress every step

Each phase reports its longest gap and the 99th percentile, and the longest gap as a ratio to the
idle phase's. Goal: under 100 ms while training. The runs follow one another in one process (the
second Start of a session, as a user would press it). The tiny model makes many steps a second,
each mostly Python, so the worker thread holds the GIL most of the time: a worst case for the
window (a real model's step waits on the GPU with the GIL released).

    python benchmarks/gui_stall.py [--steps 60] [--runs 3] [--idle 5] [--top 5] [--torch-threads N]

Runs offscreen unless a display is set (xvfb-run -a includes a real X server's painting).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TICK_MS = 5
PRESET = "#demo tiny wan LoRA"


class Timeline:
    """Times of the 5 ms timer's ticks, the phases' bounds, and what happened (for --top)."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.phases: list[tuple[str, float, float]] = []
        self.events: list[tuple[float, str]] = []
        self._open: tuple[str, float] | None = None

    def tick(self) -> None:
        self.ticks.append(time.perf_counter())

    def begin(self, name: str) -> None:
        self.end()
        self._open = (name, time.perf_counter())

    def end(self) -> None:
        if self._open is not None:
            self.phases.append((*self._open, time.perf_counter()))
            self._open = None

    def note(self, text: str) -> None:
        self.events.append((time.perf_counter(), text))

    def gaps(self, lo: float, hi: float) -> list[tuple[float, float]]:
        """(gap seconds, when it ended) between the ticks inside [lo, hi]."""
        inside = [t for t in self.ticks if lo <= t <= hi]
        return [(b - a, b) for a, b in itertools.pairwise(inside)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def watch_gc(timeline: Timeline) -> None:
    """Note collections over 20 ms: they hold the GIL, so they stall the window too."""
    started: list[float] = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif (seconds := time.perf_counter() - started[0]) > 0.02:
            timeline.note(f"gc generation {info['generation']}: {seconds * 1000:.0f} ms")

    gc.callbacks.append(callback)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="max_steps of each run")
    parser.add_argument("--runs", type=int, default=3, help="runs, one after the other")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle reference")
    parser.add_argument("--top", type=int, default=0, help="also list the N longest gaps of each phase")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch's intra-op threads (default: torch's own choice)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="vt-gui-stall-"))
    os.environ["VIDEO_TRAINER_HOME"] = str(home / "home")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    logging.basicConfig(level=logging.ERROR)

    from PySide6.QtCore import Qt, QTimer
    from PySide6.QtWidgets import QApplication

    from gui.main_window import MainWindow

    app = QApplication(sys.argv[:1])
    window = MainWindow(remember=False)
    window.load(PRESET)
    for key, value in {
        "max_steps": args.steps,
        "workspace_dir": str(home / "workspace"),
        "cache_dir": str(home / "cache"),
        "output_path": str(home / "output" / "demo.safetensors"),
    }.items():
        assert window.state.edit(key, value), key
    window.state.mark_saved()  # closing must not ask about unsaved settings
    window.resize(1120, 800)
    window.show()

    timeline = Timeline()
    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.setInterval(TICK_MS)
    timer.timeout.connect(timeline.tick)
    panel = window.run_panel
    outcomes: list[object] = []
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    def start_run() -> None:
        if args.torch_threads:
            import torch  # loaded by the warm-up

            torch.set_num_threads(args.torch_threads)
        timeline.begin(f"{len(outcomes) + 1} preparing")
        panel.start()

    def on_metrics(record: dict) -> None:
        if record["step"] == 1:
            timeline.begin(f"{len(outcomes) + 1} training")
        timeline.note(f"step {record['step']}")

    def on_finished(outcome: object) -> None:
        timeline.end()
        outcomes.append(outcome)
        if getattr(outcome, "error", None) is None and len(outcomes) < args.runs:
            QTimer.singleShot(500, start_run)
        else:
            QTimer.singleShot(200, app.quit)

    def begin_warm_up() -> None:
        timeline.begin("warm-up")
        panel.engine_ready.connect(lambda: (timeline.end(), QTimer.singleShot(500, start_run)))
        if not panel.warm_up():  # already imported (not in a fresh process)
            timeline.end()
            start_run()

    panel.metrics_arrived.connect(on_metrics)
    panel.run_finished.connect(on_finished)
    panel.log_view.textChanged.connect(lambda: timeline.note(panel.log_view.document().lastBlock().text()[10:80]))
    watch_gc(timeline)
    QTimer.singleShot(500, lambda: (timeline.begin("idle"), timer.start()))
    QTimer.singleShot(500 + int(args.idle * 1000), begin_warm_up)
    QTimer.singleShot(20 * 60 * 1000, app.quit)  # a safety net: never hang
    app.exec()
    timer.stop()
    timeline.end()
    window.close()

    failed = [o for o in outcomes if getattr(o, "error", None) is not None]
    if len(outcomes) < args.runs or failed:
        reason = failed[0].error.message if failed else "timed out"  # type: ignore[attr-defined]
        print(f"the runs did not finish: {reason}", file=sys.stderr)
        return 1
    import torch

    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"{PRESET}, {args.steps} steps x {args.runs} runs; torch {torch.__version__} with {torch.get_num_threads()} "
          f"threads; {os.cpu_count()} CPUs; Qt platform {app.platformName()}; Python {sys.version.split()[0]}")
    if load_before and load_after:
        print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"{'phase':14} {'seconds':>8} {'ticks':>7} {'longest ms':>11} {'p99 ms':>8} {'x idle':>7}")
    reference = max(g for g, _ in timeline.gaps(*timeline.phases[0][1:]))
    training_longest = []
    for name, lo, hi in timeline.phases:
        gaps = [g for g, _ in timeline.gaps(lo, hi)]
        longest = max(gaps, default=float("nan"))
        if name.endswith("training"):
            training_longest.append(longest)
        print(f"{name:14} {hi - lo:8.1f} {len(gaps):7d} {longest * 1000:11.1f} {percentile(gaps, 0.99) * 1000:8.1f} "
              f"{longest / reference:7.2f}")
    print(f"training: longest stall {max(training_longest) * 1000:.0f} ms (median of the runs' longest "
          f"{statistics.median(training_longest) * 1000:.0f} ms), {max(training_longest) / reference:.1f}x the idle window's")
    if args.top:
        origin = timeline.phases[0][1]
        for name, lo, hi in timeline.phases:
            print(f"\n{name}: longest gaps (seconds from the start, ms, the last thing before):")
            for gap, end in sorted(timeline.gaps(lo, hi), reverse=True)[: args.top]:
                before = [text for t, text in timeline.events if t <= end]
                print(f"  {end - origin:7.2f} s {gap * 1000:7.1f} ms  {before[-1] if before else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
