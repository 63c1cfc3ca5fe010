"""Python's cyclic garbage collected on the GUI thread only, while a window lives.

The window runs Python on other threads (the training engine, the estimate, the doctor, samples
between runs). An automatic collection runs on whichever thread allocates at that moment, and it
may free Qt objects there (a widget's wrapper in a reference cycle) with the GIL held. A full suite
run of the window's tests hung so: the training thread stopped inside a plain allocation (a collection),
every thread asleep, the GUI thread waiting for the GIL. So while a window exists the automatic
collector is off and a timer on the GUI thread runs the same generational collections, by the same
thresholds, between events: Qt objects are then only ever freed on their own thread, and the
worker threads' garbage is freed within `INTERVAL_MS`. The last window gone, it is on again.
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QObject, QTimer

INTERVAL_MS = 250  # often enough that a training step's garbage does not pile up

_windows = 0
_was_enabled = True


class GuiThreadCollector(QObject):
    """Owned by a window (its parent): the automatic collector off for as long as any such window
    lives, and generational collections on the GUI thread instead."""

    def __init__(self, window: QObject) -> None:
        super().__init__(window)
        global _windows, _was_enabled
        if _windows == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _windows += 1
        window.destroyed.connect(_released)
        self.collections = 0
        self._timer = QTimer(self)
        self._timer.timeout.connect(self.collect_due)
        self._timer.start(INTERVAL_MS)

    def collect_due(self) -> None:
        """The collections the automatic collector would have made by now, youngest generation first."""
        counts, thresholds = gc.get_count(), gc.get_threshold()
        generation = -1
        for level in range(3):  # a generation is collected when its count passes its threshold
            if counts[level] <= thresholds[level]:
                break
            generation = level
        if generation >= 0:
            gc.collect(generation)
            self.collections += 1


def _released() -> None:
    global _windows
    _windows = max(0, _windows - 1)
    if _windows == 0 and _was_enabled:
        gc.enable()
