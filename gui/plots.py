"""Live plots of a run: loss (raw, smoothed, validation) and learning rate, and memory, against step.

Records arrive once per optimizer step (TrainThread.metrics, already on the GUI thread). They are
appended to growing numpy buffers, and the curves are redrawn from a GUI-thread timer at most
REDRAW_HZ times a second, and only when something new arrived: a fast run costs no more drawing
than a slow one. Each curve is one PlotDataItem with peak downsampling and clip-to-view, so
100,000 points draw as a few thousand (tests/test_gui_plots.py). Curves appear with their first
point: GPU memory only with CUDA, validation loss only when the run validates.

The view ranges follow the data instead of pyqtgraph's auto-range, which moves every axis at every
new point: re-laying out and re-drawing the axes' ticks is most of a redraw's cost (about 30 of
35 ms in Qt's software painting). The step axis spans the whole run (its total is known from the
first step: it shows how far the run is, and never moves), and the value axes grow with headroom,
so they change a few dozen times in a run and a redraw mostly only paints the curves. Zooming or
panning a plot stops the following; its "A" button (bottom left, on hover) starts it again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import QEvent, Qt, QTimer
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from .plot_series import Series, grown_range, nice_ceiling
from .theme import is_dark

REDRAW_HZ = 20
GIB = float(2**30)
AXIS_WIDTH = 56  # fixed: an axis sized by its labels re-lays out the plots whenever they change


@dataclass(frozen=True)
class CurveSpec:
    field: str  # the metrics.jsonl field; curves of fields not always there appear with their first point
    plot: str  # "loss", "lr" or "memory"
    name: str  # legend
    color: str
    scale: float = 1.0  # value shown = field / scale
    symbol: str | None = None
    always: bool = False  # in every record: made with the plots, so the first steps add no legend rows
    dark: str = ""  # the colour on a dark background (the theme's); "" for the same

    def colour(self, dark: bool) -> str:
        return self.dark if dark and self.dark else self.color


# Pens are 1 px wide: Qt's software painting strokes wider lines several times slower.
# On a dark background the raw loss stays the quiet one and the smoothed loss the bright one.
CURVES = (
    CurveSpec("loss", "loss", "loss", "#a9c4e0", always=True, dark="#3f5f80"),
    CurveSpec("loss_smoothed", "loss", "loss (smoothed)", "#123f80", always=True, dark="#8ec0ff"),
    CurveSpec("val_loss", "loss", "validation loss", "#d9822b", symbol="o", dark="#f0a050"),
    CurveSpec("lr", "lr", "learning rate", "#2e8b57", always=True, dark="#5cd68f"),
    CurveSpec("cuda_allocated_bytes", "memory", "GPU allocated", "#1f5fa8", scale=GIB, dark="#6ea8ff"),
    CurveSpec("cuda_reserved_bytes", "memory", "GPU reserved", "#7b4fb0", scale=GIB, dark="#b48cf0"),
    CurveSpec("cuda_peak_bytes", "memory", "GPU peak", "#c9302c", scale=GIB, dark="#ff6b66"),
    CurveSpec("process_rss_bytes", "memory", "process RAM (RSS)", "#2e8b57", scale=GIB, always=True, dark="#5cd68f"),
)
LEVELS = {"VRAM estimate": ("#d9822b", "#f0a050"), "GPU capacity": ("#c9302c", "#ff6b66")}  # light, dark
TITLES = {"loss": "Loss", "memory": "Memory (GiB)"}


# The other processes of a multi-process run (core/train/memory_readings.py, other_processes_memory).
_PER_PROCESS = re.compile(r"^(cuda_allocated_bytes|process_rss_bytes)_rank(\d+)$")
PROCESS_COLORS = ("#6a9fd4", "#8fbc8f", "#b58fd4", "#d4a26a", "#d46a8f", "#6ad4c4", "#a0a0a0")


class _Curve:
    def __init__(self, spec: CurveSpec, item: pg.PlotDataItem) -> None:
        self.spec, self.item, self.series = spec, item, Series()
        self.drawn = 0  # points given to the item at the last redraw


class TrainingPlots(QWidget):
    """Loss and learning rate (left, stacked) and memory (right) against step."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        pg.setConfigOptions(antialias=False)
        self.dark = is_dark(self.palette())  # the colours follow the palette (follow_palette)
        self.canvas = pg.GraphicsLayoutWidget()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)

        self.plots: dict[str, pg.PlotItem] = {
            "loss": self.canvas.addPlot(row=0, col=0, title=TITLES["loss"]),
            "lr": self.canvas.addPlot(row=1, col=0),
            "memory": self.canvas.addPlot(row=0, col=2, rowspan=2, title=TITLES["memory"]),
        }
        # Each plot's legend in the column beside it, never over the curves.
        self.legends: dict[str, pg.LegendItem] = {}
        for name, (row, col, rowspan) in {"loss": (0, 1, 1), "lr": (1, 1, 1), "memory": (0, 3, 2)}.items():
            legend = self.legends[name] = pg.LegendItem(labelTextSize="8pt", verSpacing=-4)
            self.canvas.addItem(legend, row=row, col=col, rowspan=rowspan)
            # Its own size at the cell's top, not stretched over the plot's height.
            legend.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)
            self.canvas.ci.layout.setAlignment(legend, Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.canvas.ci.layout.setRowStretchFactor(0, 3)
        self.canvas.ci.layout.setRowStretchFactor(1, 1)
        # Units in titles and legends, not as axis labels: the axes' widths are fixed (AXIS_WIDTH).
        self.plots["lr"].setLabel("bottom", "step")
        self.plots["memory"].setLabel("bottom", "step")
        # No grid: in Qt's software painting pyqtgraph's grid costs 20-30 ms a repaint (5 ms without).
        for name, plot in self.plots.items():
            plot.getAxis("left").setWidth(AXIS_WIDTH)
            for axis in ("left", "bottom"):
                plot.getAxis(axis).enableAutoSIPrefix(False)  # relabelling on every range change costs
            plot.disableAutoRange()  # the ranges follow the data with headroom (module docstring)
            # On the plot, not only the curves: PlotItem.addItem gives each new item the plot's
            # own settings (its context menu's), which are off by default.
            plot.setDownsampling(auto=True, mode="peak")
            plot.setClipToView(True)
            plot.getViewBox().sigRangeChangedManually.connect(lambda _mask, name=name: self._moved_by_user(name))
            if name != "loss":
                plot.setXLink(self.plots["loss"])
        self.plots["loss"].hideAxis("bottom")  # the learning-rate plot below shows the steps
        self._follow_x = True
        self._follow_y = dict.fromkeys(self.plots, True)
        self._x_range: tuple[float, float] | None = None
        self._total_steps = 0
        self._last_step = -math.inf  # of the newest record: one at or before it starts a redone stretch
        self._y_ranges: dict[str, tuple[float, float]] = {}

        self._curves: dict[str, _Curve] = {}
        self._specs = {spec.field: spec for spec in CURVES}
        self._process_specs: dict[str, CurveSpec] = {}  # the other processes' memory lines, as they appear
        for spec in CURVES:
            if spec.always:
                self._add_curve(spec)
        self.vram_estimate_line = self._level_line("VRAM estimate")
        self.gpu_capacity_line = self._level_line("GPU capacity")
        self.follow_palette()

        # One-shot, started by the first new point after a redraw: no timer runs while nothing arrives.
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(1000 // REDRAW_HZ)
        self._timer.timeout.connect(self.redraw)

    # -- data in --------------------------------------------------------------------------------

    def add_record(self, record: Mapping[str, Any]) -> None:
        """Append one step's record (fields of metrics.jsonl); missing or null values are skipped."""
        step = record.get("step")
        if step is None:
            return
        x = float(step)
        if x <= self._last_step:
            # A continued run redoes the steps after its backup: their old points give way.
            for curve in self._curves.values():
                curve.series.truncate(x)
                curve.drawn = -1
        self._last_step = x
        for field, spec in self._specs.items():
            value = record.get(field)
            # type(), not isinstance: a bool is an int, and this runs for every field of every step.
            if (type(value) is not float and type(value) is not int) or not math.isfinite(value):
                continue
            curve = self._curves.get(field) or self._add_curve(spec)
            curve.series.append(x, value / spec.scale)
        if "process_rss_bytes_rank1" in record or "cuda_allocated_bytes_rank1" in record:  # several processes
            self._add_per_process(x, record)
        self._schedule()

    def _add_per_process(self, x: float, record: Mapping[str, Any]) -> None:
        """`cuda_allocated_bytes_rank1`, `process_rss_bytes_rank1`, ...: a line per other process."""
        for field, value in record.items():
            match = _PER_PROCESS.match(field)
            if match is None or type(value) is not int:
                continue
            spec = self._process_specs.get(field)
            if spec is None:
                base = next(s for s in CURVES if s.field == match.group(1))
                rank = int(match.group(2))
                spec = self._process_specs[field] = CurveSpec(field, "memory", f"{base.name}, process {rank}",
                                                       PROCESS_COLORS[(rank - 1) % len(PROCESS_COLORS)], scale=GIB)
            curve = self._curves.get(field) or self._add_curve(spec)
            curve.series.append(x, value / spec.scale)

    def add_records(self, records: list[Mapping[str, Any]]) -> None:
        """Append many records at once (a workspace's history) and draw them."""
        for record in records:
            self.add_record(record)
        self.redraw()

    def clear(self) -> None:
        """Forget every point (a new run starts); the views follow the data again."""
        for field, curve in list(self._curves.items()):
            if curve.spec.always:
                curve.series = Series()
                curve.item.setData([], [])
                curve.drawn = 0
            else:
                self.plots[curve.spec.plot].removeItem(curve.item)
                self.legends[curve.spec.plot].removeItem(curve.item)
                del self._curves[field]
        self._timer.stop()
        self._follow_x, self._x_range, self._total_steps = True, None, 0
        self._last_step = -math.inf
        self._follow_y = dict.fromkeys(self.plots, True)
        self._y_ranges.clear()

    def set_total_steps(self, total: int) -> None:
        """The run's planned steps: the step axis spans them (while it follows the data)."""
        self._total_steps = total
        # Now rather than at the next redraw: the first step moves every axis, and this spreads
        # the re-drawing of the axes over two repaints.
        self._follow_steps()

    def set_vram_estimate(self, value: int | None) -> None:
        """A horizontal line at the estimated VRAM need in bytes; None hides it."""
        self._set_level(self.vram_estimate_line, "VRAM estimate", value)

    def set_gpu_capacity(self, value: int | None) -> None:
        """A horizontal line at the GPU's total memory in bytes; None (no GPU) hides it."""
        self._set_level(self.gpu_capacity_line, "GPU capacity", value)

    def set_device(self, info: Mapping[str, Any]) -> None:
        """From core.train.run_info.device_info(): the capacity of the first GPU, if any."""
        gpus = info.get("gpus") or []
        self.set_gpu_capacity(gpus[0].get("total_memory_bytes") if gpus else None)

    # -- queries (tests, benchmarks) -------------------------------------------------------------

    def point_count(self, field: str) -> int:
        curve = self._curves.get(field)
        return curve.series.size if curve else 0

    def drawn_count(self, field: str) -> int:
        """Points the curve held at the last redraw."""
        curve = self._curves.get(field)
        return curve.drawn if curve else 0

    def curve_item(self, field: str) -> pg.PlotDataItem | None:
        curve = self._curves.get(field)
        return curve.item if curve else None

    # -- colours --------------------------------------------------------------------------------

    def follow_palette(self) -> None:
        """Background, axes, titles, legend text and curves in the colours of the widget's palette
        (light or dark: gui/theme.py); called again whenever the palette changes."""
        palette = self.palette()
        self.dark = is_dark(palette)
        text = palette.color(QPalette.ColorRole.WindowText)
        self.canvas.setBackground(palette.color(QPalette.ColorRole.Base))
        for name, plot in self.plots.items():
            for axis in ("left", "bottom"):
                plot.getAxis(axis).setPen(text)
                plot.getAxis(axis).setTextPen(text)
            if name in TITLES:
                plot.setTitle(TITLES[name], color=text)
        for legend in self.legends.values():
            legend.setLabelTextColor(text)
            for _sample, label in legend.items:
                label.setText(label.text, color=text)  # setLabelTextColor alone leaves drawn labels as they were
        for curve in self._curves.values():
            colour = curve.spec.colour(self.dark)
            curve.item.setPen(pg.mkPen(colour, width=1))
            curve.item.setSymbolBrush(colour)
        for name, line in (("VRAM estimate", self.vram_estimate_line), ("GPU capacity", self.gpu_capacity_line)):
            colour = LEVELS[name][self.dark]
            line.setPen(pg.mkPen(colour, width=1, style=Qt.PenStyle.DashLine))
            line.label.setColor(colour)

    def changeEvent(self, event: QEvent) -> None:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.PaletteChange:
            self.follow_palette()
        super().changeEvent(event)

    # -- drawing --------------------------------------------------------------------------------

    def redraw(self) -> None:
        """Give every curve with new points its data (the timer calls this; tests may too)."""
        for curve in self._curves.values():
            if curve.series.size != curve.drawn:
                # Views of the buffers: pyqtgraph keeps them until the next setData, and the buffers
                # are only ever appended to (or replaced when they grow), never changed in place.
                curve.item.setData(curve.series.x, curve.series.y)
                curve.drawn = curve.series.size
        self._follow()

    def _schedule(self) -> None:
        if not self._timer.isActive():
            self._timer.start()

    def _follow(self) -> None:
        """Grow the view ranges that follow the data until they hold it (see the module docstring)."""
        if not any(curve.series.size for curve in self._curves.values()):
            return
        self._follow_steps()
        for name, plot in self.plots.items():
            if not self._follow_y[name]:
                continue
            series = [c.series for c in self._curves.values() if c.spec.plot == name and c.series.size]
            levels = [line.value() for line in (self.vram_estimate_line, self.gpu_capacity_line) if name == "memory" and line.isVisible()]
            if not series and not levels:
                continue
            lo = min([s.y_min for s in series] + levels)
            hi = max([s.y_max for s in series] + levels)
            y_range = grown_range(self._y_ranges.get(name), lo, hi, from_zero=name != "loss")
            if y_range is not None:
                plot.setYRange(*y_range, padding=0)
                self._y_ranges[name] = y_range

    def _follow_steps(self) -> None:
        if not self._follow_x:
            return
        last = max((curve.series.x[-1] for curve in self._curves.values() if curve.series.size), default=1.0)
        x_range = (0.0, float(self._total_steps) if last <= self._total_steps else nice_ceiling(max(last, 1.0) * 1.05))
        if x_range != self._x_range:
            self.plots["loss"].setXRange(*x_range, padding=0)  # the other plots are linked
            self._x_range = x_range

    def _moved_by_user(self, name: str) -> None:
        view = self.plots[name].getViewBox()
        if any(view.autoRangeEnabled()):  # its "A" button: follow the data again
            view.disableAutoRange()
            self._follow_x, self._x_range = True, None
            self._follow_y[name] = True
            self._y_ranges.pop(name, None)
            self._follow()
        else:  # zoomed or panned: hold the view (x for every plot, as they share it)
            self._follow_x = False
            self._follow_y[name] = False

    def _add_curve(self, spec: CurveSpec) -> _Curve:
        colour = spec.colour(self.dark)
        item = pg.PlotDataItem(
            name=spec.name,
            pen=pg.mkPen(colour, width=1),
            symbol=spec.symbol,
            symbolSize=5,
            symbolBrush=colour,
            symbolPen=None,
        )
        self.plots[spec.plot].addItem(item)
        self.legends[spec.plot].addItem(item, spec.name)
        item.setDownsampling(auto=True, method="peak")
        item.setClipToView(True)
        curve = self._curves[spec.field] = _Curve(spec, item)
        return curve

    def _level_line(self, name: str) -> pg.InfiniteLine:
        color = LEVELS[name][self.dark]
        line = pg.InfiniteLine(
            angle=0,
            pen=pg.mkPen(color, width=1, style=pg.QtCore.Qt.PenStyle.DashLine),
            label=name,
            labelOpts={"position": 0.05, "color": color, "anchors": [(0, 1), (0, 1)]},
        )
        line.setVisible(False)  # hidden lines do not count into the auto range
        self.plots["memory"].addItem(line)
        return line

    def _set_level(self, line: pg.InfiniteLine, name: str, value: int | None) -> None:
        if value is None:
            line.setVisible(False)
            self._y_ranges.pop("memory", None)  # may shrink back to the data
            self._schedule()
            return
        line.setPos(value / GIB)
        line.label.setFormat(f"{name} {value / GIB:.1f} GiB")
        line.setVisible(True)
        self._schedule()  # the memory view grows to show it
