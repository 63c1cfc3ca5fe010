"""The overfitting gauge: how many times each item of a dataset is seen over the run, on a coloured scale.

The bands are core.data.doctor's ratings (exposure_rating): under 10 conservative, 10 to 50
moderate, above 50 high, 100 and more risky. The scale is logarithmic (1 to 300 times), so that
2, 20 and 200 are evenly apart, as the risk grows with the order of magnitude rather than the count.
"""

from __future__ import annotations

import math

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPainterPath, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

# core.data.doctor's rating names (CONSERVATIVE, MODERATE, HIGH, RISKY), spelled out so the window
# does not import the doctor (and numpy) before it shows; tests/test_gui_doctor.py checks they match.
CONSERVATIVE, MODERATE, HIGH, RISKY = "conservative", "moderate", "high", "risky"
RATING_COLOURS = {
    CONSERVATIVE: QColor("#4cae4c"),
    MODERATE: QColor("#e0a030"),
    HIGH: QColor("#e8743b"),
    RISKY: QColor("#d9534f"),
}
BANDS = ((1.0, 10.0, CONSERVATIVE), (10.0, 50.0, MODERATE), (50.0, 100.0, HIGH), (100.0, 300.0, RISKY))
SCALE_MAX = 300.0


def rating_colour(rating: str) -> QColor:
    return RATING_COLOURS.get(rating, QColor("#888888"))


def scale_position(times_seen: float) -> float:
    """Where on the gauge (0 to 1) a count falls: log scale from 1 to SCALE_MAX, clamped."""
    if times_seen <= 1:
        return 0.0
    return min(1.0, math.log(times_seen) / math.log(SCALE_MAX))


class ExposureGauge(QWidget):
    """A thin bar of the four bands, the marker at `times_seen`; None draws the bands only."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.times_seen: float | None = None
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setMinimumWidth(120)

    def set_times_seen(self, times: float | None) -> None:
        self.times_seen = times
        self.update()

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(240, self.fontMetrics().height() + 4)

    def paintEvent(self, _event: QPaintEvent) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        marker = 6.0
        bar = QRectF(marker, self.height() * 0.35, self.width() - 2 * marker, self.height() * 0.4)
        faded = self.times_seen is None
        for low, high, rating in BANDS:
            x0 = bar.left() + bar.width() * scale_position(low)
            x1 = bar.left() + bar.width() * scale_position(high)
            colour = QColor(rating_colour(rating))
            colour.setAlpha(70 if faded else 170)
            painter.fillRect(QRectF(x0, bar.top(), x1 - x0, bar.height()), colour)
        if self.times_seen is None:
            return
        x = bar.left() + bar.width() * scale_position(self.times_seen)
        # A downward triangle above the bar and a line through it.
        path = QPainterPath(QPointF(x - marker, 0.5))
        path.lineTo(x + marker, 0.5)
        path.lineTo(x, bar.top())
        path.closeSubpath()
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(self.palette().windowText())
        painter.drawPath(path)
        painter.setPen(QPen(self.palette().windowText(), 2))
        painter.drawLine(QPointF(x, bar.top()), QPointF(x, bar.bottom()))
