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

With --editor N it measures the dataset editor instead of a run: the Data tab opened on a folder of
N small clips (copies of one clip, every tenth without a caption), its phases
    Data tab      the tab shown: its page built, the doctor's and the editor's first look at the
                  preset's demo dataset
    editor, cold  the folder chosen until it is listed, every thumbnail made (the per-user cache
                  empty) and the dataset doctor's report (it probes all N) merged into the grid
    editor, warm  the folder listed again: the thumbnails read from the cache
    filters       the "No caption" and "Has problems" filters toggled, the grid scrolled to the end

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
    parser.add_argument("--editor", type=int, default=0, metavar="N", help="measure the dataset editor on N clips instead of a run")
    args = parser.parse_args()
    if args.editor:
        return editor_main(args)

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
        print_top(timeline, args.top)
    return 0


def print_top(timeline: Timeline, top: int) -> None:
    origin = timeline.phases[0][1]
    for name, lo, hi in timeline.phases:
        print(f"\n{name}: longest gaps (seconds from the start, ms, the last thing before):")
        for gap, end in sorted(timeline.gaps(lo, hi), reverse=True)[:top]:
            before = [text for t, text in timeline.events if t <= end]
            print(f"  {end - origin:7.2f} s {gap * 1000:7.1f} ms  {before[-1] if before else ''}")


def clip_folder(folder: Path, count: int) -> Path:
    """count copies of one small clip (copies, not links: discovery uses a linked file once), each
    with a caption but every tenth."""
    sys.path.insert(0, str(ROOT / "tests"))
    from media_factory import make_clip

    folder.mkdir(parents=True)
    make_clip(folder / "clip.mp4", width=96, height=64, fps=16, seconds=1.0)
    data = (folder / "clip.mp4").read_bytes()
    (folder / "clip.mp4").unlink()
    for i in range(count):
        (folder / f"clip_{i:04d}.mp4").write_bytes(data)
        if i % 10:
            (folder / f"clip_{i:04d}.txt").write_text(f"clip number {i}", encoding="utf-8")
    return folder


def report(timeline: Timeline, header: str) -> None:
    print(header)
    print(f"{'phase':14} {'seconds':>8} {'ticks':>7} {'longest ms':>11} {'p99 ms':>8} {'x idle':>7}")
    reference = max(g for g, _ in timeline.gaps(*timeline.phases[0][1:]))
    for name, lo, hi in timeline.phases:
        gaps = [g for g, _ in timeline.gaps(lo, hi)]
        longest = max(gaps, default=float("nan"))
        print(f"{name:14} {hi - lo:8.1f} {len(gaps):7d} {longest * 1000:11.1f} {percentile(gaps, 0.99) * 1000:8.1f} "
              f"{longest / reference:7.2f}")


def editor_main(args: argparse.Namespace) -> int:
    """The --editor variant: the Data tab's dataset editor on a folder of args.editor clips."""
    home = Path(tempfile.mkdtemp(prefix="vt-gui-stall-editor-"))
    os.environ["VIDEO_TRAINER_HOME"] = str(home / "home")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    logging.basicConfig(level=logging.ERROR)
    made = time.perf_counter()
    folder = clip_folder(home / "clips", args.editor)
    made = time.perf_counter() - made

    from PySide6.QtCore import Qt, QTimer
    from PySide6.QtWidgets import QApplication

    from gui.main_window import MainWindow

    app = QApplication(sys.argv[:1])
    window = MainWindow(remember=False)
    window.load(PRESET)
    window.state.mark_saved()
    window.resize(1120, 800)
    window.show()
    timeline = Timeline()
    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.setInterval(TICK_MS)
    timer.timeout.connect(timeline.tick)
    watch_gc(timeline)
    steps: list[tuple[str, object]] = []  # (phase, action) in order; a phase ends when all is quiet

    def quiet() -> bool:
        editor, doctor = window.dataset_editor, window.doctor_panel
        return not editor.job.is_busy() and not editor.loader.pending() and not doctor.job.is_busy()

    def choose() -> None:
        window.state.edit("datasets", [{"path": str(folder), "repeats": 1}])

    def filters_and_scroll() -> None:
        editor = window.dataset_editor
        for box in (editor.no_caption_box, editor.problems_box, editor.no_caption_box, editor.problems_box):
            box.toggle()
            app.processEvents()
        bar = editor.grid.verticalScrollBar()
        for value in range(bar.minimum(), bar.maximum() + 1, max(1, bar.pageStep() // 2)):
            bar.setValue(value)
            app.processEvents()

    steps += [("Data tab", lambda: window.select_tab("data")), ("editor, cold", choose),
              ("editor, warm", lambda: window.dataset_editor.reload()), ("filters", filters_and_scroll)]

    def next_step() -> None:
        if not steps:
            timeline.end()
            window.state.mark_saved()  # quitting closes the window, which must not ask about the datasets
            QTimer.singleShot(200, app.quit)
            return
        name, action = steps.pop(0)
        timeline.begin(name)
        action()  # type: ignore[operator]
        wait_quiet()

    def wait_quiet() -> None:
        QTimer.singleShot(100, lambda: next_step() if quiet() else wait_quiet())

    QTimer.singleShot(500, lambda: (timeline.begin("idle"), timer.start()))
    QTimer.singleShot(500 + int(args.idle * 1000), next_step)
    QTimer.singleShot(20 * 60 * 1000, app.quit)
    app.exec()
    timer.stop()
    timeline.end()
    shown = window.dataset_editor.model.rowCount()
    thumbnails = len(window.dataset_editor.model.thumbnails)
    window.close()
    if args.top:
        print_top(timeline, args.top)
    report(timeline, f"dataset editor on {args.editor} clips of 96x64, 1 s ({made:.1f} s to copy them); {shown} listed, "
                     f"{thumbnails} thumbnails; {os.cpu_count()} CPUs; Qt platform {app.platformName()}; Python {sys.version.split()[0]}")
    return 0 if shown == args.editor and thumbnails == args.editor else 1


if __name__ == "__main__":
    sys.exit(main())
