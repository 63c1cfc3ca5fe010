"""The live plots: records become curve points, redrawn from a GUI timer only when new data came,
downsampled so 100,000 points stay cheap, with the memory levels as lines and views that follow."""

from __future__ import annotations

import math
import os
import time

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QApplication

from gui.plots import GIB, REDRAW_HZ, Series, TrainingPlots, grown_range, nice_ceiling


def record(step: int, **extra: object) -> dict:
    base = {"step": step, "loss": 1.0 / step, "loss_smoothed": 1.0 / step, "lr": 1e-3,
            "cuda_allocated_bytes": None, "cuda_reserved_bytes": None, "cuda_peak_bytes": None,
            "process_rss_bytes": 2 * 2**30 + step}
    return {**base, **extra}


@pytest.fixture
def plots(qtbot) -> TrainingPlots:
    widget = TrainingPlots()
    qtbot.addWidget(widget)
    widget.resize(700, 320)
    widget.show()
    return widget


def test_series_grows_and_keeps_its_range() -> None:
    series = Series(capacity=2)
    for i, y in enumerate([3.0, -1.0, 5.0, 2.0, 0.5]):
        series.append(i, y)
    assert series.size == 5 and list(series.x) == [0, 1, 2, 3, 4] and list(series.y) == [3, -1, 5, 2, 0.5]
    assert (series.y_min, series.y_max) == (-1.0, 5.0)


def test_ranges_grow_rarely_and_from_zero_where_asked() -> None:
    assert [nice_ceiling(v) for v in (0.3, 1, 1.05, 2.1, 7, 40, 101)] == [0.5, 1, 2, 2.5, 10, 50, 200]
    assert grown_range((0.0, 10.0), 2.0, 8.0, from_zero=False) is None  # holds the data: unchanged
    lo, hi = grown_range(None, 2.0, 4.0, from_zero=False)
    assert lo < 2.0 and hi > 4.0
    assert grown_range(None, 1.5, 2.5, from_zero=True)[0] == 0.0
    lo, hi = grown_range(None, 3.0, 3.0, from_zero=False)  # one point: a range around it
    assert lo < 3.0 < hi


def test_points_arrive_and_are_drawn_by_the_timer(plots: TrainingPlots, qtbot) -> None:
    for step in range(1, 6):
        plots.add_record(record(step))
    assert plots.point_count("loss") == 5 and plots.point_count("process_rss_bytes") == 5
    assert plots.drawn_count("loss") == 0  # not yet: drawing waits for the timer
    qtbot.waitUntil(lambda: plots.drawn_count("loss") == 5, timeout=2000)
    x, y = plots.curve_item("process_rss_bytes").getData()
    assert list(x) == [1, 2, 3, 4, 5] and y[0] == pytest.approx((2 * 2**30 + 1) / GIB)
    assert not plots._timer.isActive()  # nothing new: no timer runs


def test_redraws_at_most_at_the_timer_rate(plots: TrainingPlots, qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    redraws: list[float] = []
    original = plots.redraw
    monkeypatch.setattr(plots, "redraw", lambda: (redraws.append(time.perf_counter()), original()))
    plots._timer.timeout.disconnect()
    plots._timer.timeout.connect(plots.redraw)
    start = time.perf_counter()
    for step in range(1, 301):
        plots.add_record(record(step))
        QApplication.processEvents()  # the timer fires when it is due, whatever arrives
    elapsed = time.perf_counter() - start
    qtbot.waitUntil(lambda: plots.drawn_count("loss") == 300, timeout=2000)
    assert len(redraws) <= elapsed * REDRAW_HZ + 2 and len(redraws) < 100  # by the clock, not per record


def test_missing_and_null_values_are_left_out(plots: TrainingPlots) -> None:
    plots.add_record(record(1))
    plots.add_record(record(2, loss=None, loss_smoothed=math.nan))  # a skipped (non-finite) step
    plots.add_record(record(3, val_loss=0.5))
    plots.add_record({"epoch": 0})  # no step: ignored
    assert plots.point_count("loss") == 2 and plots.point_count("loss_smoothed") == 2
    assert plots.point_count("val_loss") == 1  # appears with its first point
    assert plots.curve_item("cuda_allocated_bytes") is None  # null without CUDA: no curve at all
    plots.add_record(record(4, cuda_allocated_bytes=2**30, cuda_reserved_bytes=2**31, cuda_peak_bytes=3 * 2**30))
    assert plots.point_count("cuda_peak_bytes") == 1

    plots.clear()
    assert plots.point_count("loss") == 0 and plots.curve_item("val_loss") is None
    assert plots.curve_item("loss") is not None  # always-present curves stay, empty


def test_memory_levels_are_lines_the_view_shows(plots: TrainingPlots) -> None:
    plots.add_record(record(1))
    plots.set_gpu_capacity(24 * 2**30)
    plots.set_vram_estimate(11 * 2**30)
    plots.redraw()
    assert plots.gpu_capacity_line.isVisible() and plots.gpu_capacity_line.value() == pytest.approx(24)
    assert "24.0 GiB" in plots.gpu_capacity_line.label.format
    low, high = plots.plots["memory"].getViewBox().viewRange()[1]
    assert low <= 0 and high >= 24  # the capacity is in view, not only the data
    plots.set_device({"gpus": []})  # a run on a machine without a GPU
    plots.set_vram_estimate(None)
    assert not plots.gpu_capacity_line.isVisible() and not plots.vram_estimate_line.isVisible()


def test_step_axis_spans_the_run_and_zoom_stops_following(plots: TrainingPlots) -> None:
    plots.set_total_steps(200)
    for step in range(1, 11):
        plots.add_record(record(step))
    plots.redraw()
    view = plots.plots["loss"].getViewBox()
    assert view.viewRange()[0] == pytest.approx([0, 200])
    assert plots.plots["memory"].getViewBox().viewRange()[0] == pytest.approx([0, 200])  # linked

    view.setXRange(2, 5, padding=0)
    view.sigRangeChangedManually.emit([True, True])  # as a wheel zoom does
    plots.add_record(record(300))  # beyond the total
    plots.redraw()
    assert view.viewRange()[0] == pytest.approx([2, 5])  # held

    view.enableAutoRange()  # the "A" button
    view.sigRangeChangedManually.emit([True, True])
    assert view.viewRange()[0][1] >= 300 and not any(view.autoRangeEnabled())  # following again


def test_100000_points_stay_cheap(plots: TrainingPlots) -> None:
    plots.set_total_steps(100_000)
    for step in range(1, 100_001):
        plots.add_record(record(step))
    plots.redraw()
    plots.grab()  # the first paint
    item = plots.curve_item("loss")
    assert item.opts["autoDownsample"] and item.opts["clipToView"] and item.opts["downsampleMethod"] == "peak"
    timings = []
    for step in range(100_001, 100_011):
        plots.add_record(record(step))
        start = time.perf_counter()
        plots.redraw()
        plots.canvas.viewport().repaint()
        timings.append(time.perf_counter() - start)
    # Drawn as a few thousand points: about 30 ms here; 400 ms without downsampling.
    assert sorted(timings)[len(timings) // 2] < 0.2
    assert len(item.curve.getData()[0]) < 10_000


def test_legends_sit_beside_the_curves_not_over_them(plots: TrainingPlots) -> None:
    plots.add_records([record(i, val_loss=0.5) for i in range(1, 30)])
    QApplication.processEvents()
    for name, plot in plots.plots.items():
        legend = plots.legends[name]
        assert legend.items, name  # each plot's curves are named in its legend
        assert not plot.getViewBox().sceneBoundingRect().intersects(legend.sceneBoundingRect()), name


def test_steps_redone_by_a_continued_run_replace_their_old_points(plots: TrainingPlots) -> None:
    plots.add_records([record(i) for i in range(1, 11)])  # a run that reached step 10
    plots.add_records([record(i, loss=9.0) for i in range(7, 13)])  # continued from its backup of step 6
    assert plots.point_count("loss") == 12 and plots.drawn_count("loss") == 12
    item = plots.curve_item("loss")
    xs, ys = item.getData()
    assert list(xs) == list(range(1, 13)) and list(ys[6:]) == [9.0] * 6
