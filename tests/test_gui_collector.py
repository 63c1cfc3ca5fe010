"""Garbage is collected on the GUI thread only while a window lives (gui/collector.py): the training
thread's allocations never start a collection there, where freeing a Qt object with the GIL held
deadlocked a run once; the automatic collector is back when the last window is gone."""

from __future__ import annotations

import gc
import os
import threading

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from test_gui_run import run_to_end, shared_cache, slot_threads, window  # noqa: F401 - fixtures used by name

from gui.main_window import MainWindow


def test_a_run_collects_garbage_on_the_gui_thread_only(qtbot, window: MainWindow) -> None:
    assert not gc.isenabled()
    threads: list[int] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            threads.append(threading.get_ident())

    gc.callbacks.append(record)
    try:
        assert window.state.edit("max_steps", 6)
        outcome = run_to_end(qtbot, window)
    finally:
        gc.callbacks.remove(record)
    assert outcome.error is None and outcome.steps == 6
    assert threads and set(threads) == {threading.get_ident()}, "a collection ran on another thread"
    assert window.collector.collections > 0


def test_the_automatic_collector_is_on_again_when_the_last_window_is_gone(qtbot) -> None:
    import gui.collector as collector

    qtbot.waitUntil(lambda: gc.collect() >= 0 and collector._windows == 0, timeout=10_000)  # earlier tests' windows
    assert gc.isenabled()
    first, second = MainWindow(remember=False), MainWindow(remember=False)
    assert not gc.isenabled()
    with qtbot.waitSignal(first.destroyed, timeout=10_000):
        first.deleteLater()
    assert not gc.isenabled()  # the second still lives
    with qtbot.waitSignal(second.destroyed, timeout=10_000):
        second.deleteLater()
    assert gc.isenabled()
