"""The numbers behind the live plots (gui/plots.py): growing buffers of points, and view ranges that
grow with headroom rather than at every point."""

from __future__ import annotations

import math

import numpy as np

HEADROOM = 0.3  # a range that grows is grown by this share of the data's span, so it grows rarely


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is >= value (> 0)."""
    scale = 10.0 ** math.floor(math.log10(value))
    return next(m * scale for m in (1, 2, 2.5, 5, 10) if m * scale >= value)


def grown_range(current: tuple[float, float] | None, lo: float, hi: float, *, from_zero: bool) -> tuple[float, float] | None:
    """A view range that holds [lo, hi]: None if `current` does, else a new one with headroom
    (starting at 0 when `from_zero`, for memory and learning rates)."""
    if from_zero:
        lo = min(lo, 0.0)
    if current is not None and current[0] <= lo and hi <= current[1]:
        return None
    span = hi - lo if hi > lo else (abs(hi) * 0.5 or 1.0)
    return (lo if from_zero and lo == 0.0 else lo - HEADROOM * span), hi + HEADROOM * span


class Series:
    """x/y values of one curve: numpy buffers that double when full, filled from short lists once per
    redraw (appending to a list is several times cheaper than writing one numpy element), and the
    range of y kept as points arrive."""

    def __init__(self, capacity: int = 1024) -> None:
        self._x = np.empty(capacity, dtype=np.float64)
        self._y = np.empty(capacity, dtype=np.float64)
        self._stored = 0
        self._new_x: list[float] = []
        self._new_y: list[float] = []
        self.y_min, self.y_max = math.inf, -math.inf

    @property
    def size(self) -> int:
        return self._stored + len(self._new_x)

    def append(self, x: float, y: float) -> None:
        self._new_x.append(x)
        self._new_y.append(y)
        self.y_min = min(self.y_min, y)
        self.y_max = max(self.y_max, y)

    @property
    def x(self) -> np.ndarray:
        self._store()
        return self._x[: self._stored]

    @property
    def y(self) -> np.ndarray:
        self._store()
        return self._y[: self._stored]

    def truncate(self, x: float) -> None:
        """Drop the points at x and after (a continued run redoes the steps after its backup)."""
        self._store()
        keep = int(np.searchsorted(self._x[: self._stored], x, side="left"))
        if keep == self._stored:
            return
        self._stored = keep
        kept = self._y[:keep]
        self.y_min, self.y_max = (float(kept.min()), float(kept.max())) if keep else (math.inf, -math.inf)

    def _store(self) -> None:
        end = self.size
        if end == self._stored:
            return
        if end > len(self._x):
            capacity = max(end, 2 * len(self._x))
            self._x, self._y = np.resize(self._x, capacity), np.resize(self._y, capacity)
        self._x[self._stored : end] = self._new_x
        self._y[self._stored : end] = self._new_y
        self._stored = end
        self._new_x.clear()
        self._new_y.clear()
