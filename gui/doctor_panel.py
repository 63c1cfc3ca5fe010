"""The dataset doctor beside the Data tab: counts, the overfitting gauge, the bucket plan, broken files.

core.data.doctor.diagnose runs on a BackgroundJob (it probes every file with PyAV), a moment after
the settings it reads stop changing. When only the plan's arithmetic changes (max_steps, epochs,
batch size, gradient accumulation, repeats), gui.doctor_plan.replan redoes it from the last report
at once, without opening a file. "Check again" probes anew (after files were added to a folder).
"""

from __future__ import annotations

import copy
import html
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QGridLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from core.paths import shown_path

from .background import BackgroundJob, JobControl
from .config_state import ConfigState
from .doctor_plan import probe_inputs, replan
from .exposure_gauge import ExposureGauge, rating_colour
from .side_panel import SidePanel, muted_label, title_label

if TYPE_CHECKING:
    from core.data.doctor import DatasetReport

DEBOUNCE_MS = 600  # typing a folder path or a resolution: wait for a pause before probing
RECHECK_AFTER_S = 60.0  # shown again after this long, the folders are looked at again
TABLE_ROWS_SHOWN = 8
FATAL_COLOUR = QColor("#c9302c")


def diagnose(config: dict[str, Any], progress: Any = None) -> DatasetReport:
    """core.data.doctor.diagnose, imported on the worker thread at the first check, not with the window;
    with the model's frame counts and sizes when its folder is at hand (core.models.shape)."""
    from core.data.doctor import diagnose as core_diagnose
    from core.models.shape import model_shape

    from .train_worker import import_engine

    # model_shape reads the model folder through the families' adapters, which import diffusers and
    # torch: done here through import_engine, whose gc.freeze() keeps those half a million objects
    # out of every later full collection (each otherwise a 0.3-0.6 s pause of the window too).
    import_engine()

    return core_diagnose(config, progress, model_shape(config))


def _diagnose(config: dict[str, Any], control: JobControl) -> DatasetReport:
    return diagnose(config, control.progress)


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _times(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _table(headers: list[str]) -> QTableWidget:
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.verticalHeader().setVisible(False)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setWordWrap(False)
    header = table.horizontalHeader()
    for column in range(len(headers)):
        header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
    header.setStretchLastSection(True)
    # No horizontal scrolling in a panel that scrolls itself: long paths are cut in the middle and
    # shown whole in the tooltip.
    table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
    rows = table.verticalHeader()
    rows.setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
    rows.setDefaultSectionSize(table.fontMetrics().height() + 8)  # compact: these are lists, not forms
    return table


def _fill(table: QTableWidget, rows: list[tuple[list[str], str, QColor | None]]) -> None:
    """Rows of (cells, tooltip, colour); the table's height follows its rows up to TABLE_ROWS_SHOWN."""
    table.setRowCount(len(rows))
    for r, (cells, tip, colour) in enumerate(rows):
        for c, text in enumerate(cells):
            item = QTableWidgetItem(text)
            item.setToolTip(tip or text)
            if colour is not None:
                item.setForeground(colour)
            table.setItem(r, c, item)
    table.resizeColumnsToContents()
    shown = min(len(rows), TABLE_ROWS_SHOWN)
    height = table.horizontalHeader().height() + 2 * table.frameWidth()
    height += sum(table.rowHeight(r) for r in range(shown))
    table.setFixedHeight(height)
    table.setVisible(bool(rows))


class DoctorPanel(SidePanel):
    reported = Signal(object, object)  # (the settings checked, their DatasetReport): the start check reads it

    def __init__(self, state: ConfigState, parent: QWidget | None = None) -> None:
        super().__init__("Dataset doctor", parent)
        self.state = state
        self.report: DatasetReport | None = None  # the last diagnose() result
        self.shown_report: DatasetReport | None = None  # it, replanned for the current settings
        self._report_inputs: dict[str, Any] | None = None
        self._checked_at = 0.0
        self.error: str | None = None
        self._idle_text = ""  # the status line when no check is running

        self.job = BackgroundJob(_diagnose, DEBOUNCE_MS, "the dataset doctor", self)
        self.job.finished_ok.connect(self._diagnosed)
        self.job.failed.connect(self._failed)
        self.job.busy.connect(self._busy)
        self.job.progress.connect(self._progress)

        self.check_button = QPushButton("Check again")
        self.check_button.setToolTip("Look at the dataset folders again (after adding or fixing files)")
        self.check_button.clicked.connect(self.check_now)
        self.header.addWidget(self.check_button)

        self.progress_bar = QProgressBar()
        self.progress_bar.setMaximumHeight(self.fontMetrics().height())
        self.progress_bar.setTextVisible(False)
        self.progress_bar.hide()
        self.status_label = muted_label()
        self.result_label = QLabel()
        self.result_label.setObjectName("doctorResult")
        self.result_label.setWordWrap(True)

        column = self.body
        column.addWidget(self.progress_bar)
        column.addWidget(self.status_label)
        column.addWidget(self.result_label)

        self.gauge_title = title_label("Times each item is seen")
        column.addWidget(self.gauge_title)
        self.gauge_help = muted_label(
            "Over the whole run. Under 10: conservative; 10 to 50: moderate; above 50: high; 100 or more: "
            "risky (likely to overfit)."
        )
        column.addWidget(self.gauge_help)
        self.gauges = QGridLayout()
        self.gauges.setHorizontalSpacing(10)
        self.gauges.setColumnStretch(1, 1)
        column.addLayout(self.gauges)
        self.gauge_rows: list[tuple[QLabel, ExposureGauge, QLabel, QLabel]] = []

        self.media_label = QLabel()
        self.media_label.setWordWrap(True)
        self.plan_label = QLabel()
        self.plan_label.setWordWrap(True)
        column.addWidget(self.media_label)
        column.addWidget(self.plan_label)

        self.buckets_title = title_label("Buckets")
        self.buckets_table = _table(["shape", "kind", "items", "per pass", "batch", "batches"])
        self.buckets_table.setToolTip(
            "Every batch holds samples of one shape: frames x height x width.\n"
            "'per pass' counts each item with its dataset's repeats; 'batch' is the batch size of that kind."
        )
        self.problems_title = title_label("Problems")
        self.problems_table = _table(["file", "problem"])
        for widget in (self.buckets_title, self.buckets_table, self.problems_title, self.problems_table):
            column.addWidget(widget)
        column.addStretch(1)
        self.state.edited.connect(lambda _key: self.settings_changed())
        self.state.replaced.connect(self.settings_changed)
        self._show(None)

    # -- following the settings ------------------------------------------------------------------

    def refresh(self) -> None:
        config = self.state.config
        if self.report is not None and probe_inputs(config) == self._report_inputs:
            # Only the arithmetic changed: the gauge follows at once, no file is opened.
            self._show(replan(self.report, config))
            if time.monotonic() - self._checked_at < RECHECK_AFTER_S or self.job.is_busy():
                return
        self.job.request(copy.deepcopy(config))

    def check_now(self) -> None:
        self.job.request(copy.deepcopy(self.state.config), now=True)

    def settle(self, timeout_ms: int = 30_000) -> bool:
        return self.job.wait(timeout_ms)

    def shutdown(self) -> None:
        self.job.shutdown()

    # -- the job's reports -----------------------------------------------------------------------

    def _diagnosed(self, config: dict[str, Any], report: DatasetReport) -> None:
        self.report, self.error = report, None
        self._report_inputs = probe_inputs(config)
        self._checked_at = time.monotonic()
        current = self.state.config
        self._show(replan(report, current) if probe_inputs(current) == self._report_inputs else report)
        self.reported.emit(config, report)

    def _failed(self, _config: dict[str, Any], message: str) -> None:
        self.error = message
        self._idle_text = f"The doctor could not check the data: {message}"
        self._set_status(self._idle_text)

    def _busy(self, busy: bool) -> None:
        self.check_button.setEnabled(not busy)
        self.progress_bar.setVisible(busy)
        if busy:
            self.progress_bar.setRange(0, 0)
            self._set_status("Checking the dataset...")
        else:
            self._set_status(self._idle_text)

    def _progress(self, done: int, total: int) -> None:
        if total > 0:
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(done)
            self._set_status(f"Checking the dataset: {done} of {_count(total, 'file')}...")

    # -- showing ---------------------------------------------------------------------------------

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)
        self.status_label.setVisible(bool(text))

    def _show(self, report: DatasetReport | None) -> None:
        self.shown_report = report
        if self.error is None:
            what = "images" if report is not None and report.settings.get("stills_only") else "clips"
            self._idle_text = "" if report is None or report.datasets else f"Add a folder of {what} to see how training would use it."
        if not self.job.is_busy():
            self._set_status(self._idle_text)
        has_data = report is not None and bool(report.datasets)
        for widget in (self.result_label, self.gauge_title, self.gauge_help, self.media_label, self.plan_label):
            widget.setVisible(has_data)
        if report is None or not report.datasets:
            self.result_label.setText("")
            for widget in (self.media_label, self.plan_label):
                widget.setText("")
            self._show_gauges([])
            _fill(self.buckets_table, [])
            self.buckets_title.hide()
            self._show_problems(report)
            return
        from core.data.doctor_report import images_only  # the report's module: loaded with it, off the first paint

        self._show_result(report)
        self._show_gauges(report.datasets)
        units = {d.unit for d in report.datasets if d.clips + d.images}
        self.gauge_title.setText(f"Times each {units.pop() if len(units) == 1 else 'item'} is seen")
        if images_only(report):  # an image model, or image folders: no clips to count
            usable = _count(report.images, "usable image")
        else:
            seconds = f" ({report.total_duration:.0f} s in all)" if report.clips else ""
            usable = f"{_count(report.clips, 'usable clip')}{seconds}, {_count(report.images, 'image')}"
        captions = report.captions
        self.media_label.setText(
            f"Found {_count(report.media_found, 'media file')}: {usable}; {_count(report.unusable_files, 'broken file')}. "
            f"Captions: {captions.get('missing', 0)} missing, {captions.get('empty', 0)} empty."
        )
        s = report.settings
        if report.train_items:
            length = f"{s.get('epochs')} epochs" if s.get("stop_after") == "EPOCHS" else f"{s.get('max_steps')} steps"
            self.plan_label.setText(
                f"{_count(report.train_items, 'item')} to train, {report.validation_items} for validation. "
                f"{_count(report.batches_per_pass, 'batch', 'batches')} per pass; {length} draw "
                f"{report.total_batches} batches ({report.optimizer_steps} optimizer steps)."
            )
        else:
            self.plan_label.setText("")
        _fill(
            self.buckets_table,
            [([str(b.bucket), b.kind, str(b.items), str(b.samples_per_pass), str(b.batch_size), str(b.batches_per_pass)], "", None)
             for b in report.buckets],
        )
        self.buckets_title.setVisible(bool(report.buckets))
        self._show_problems(report)

    def _show_result(self, report: DatasetReport) -> None:
        fatal = len(report.fatal_issues)
        if not report.usable:
            text, colour = f"Nothing to train on: {report.why_unusable}.", FATAL_COLOUR.name()
        elif report.strict_refused:
            text = f"strict_data refuses to train: {_count(fatal, 'problem')} below. Fix them, or turn Strict data off to skip those files."
            colour = FATAL_COLOUR.name()
        else:
            skipped = f"; {_count(fatal, 'file')} left out (below)" if fatal else ""
            text, colour = f"Ready: {_count(report.train_items, 'item')} can train{skipped}.", "#2e7d32"
        self.result_label.setText(f'<span style="color:{colour}">{html.escape(text)}</span>')

    def _show_gauges(self, datasets: list[Any]) -> None:
        while len(self.gauge_rows) > len(datasets):
            for widget in self.gauge_rows.pop():
                self.gauges.removeWidget(widget)
                widget.deleteLater()
        while len(self.gauge_rows) < len(datasets):
            row = len(self.gauge_rows)
            name, gauge, verdict, hint = QLabel(), ExposureGauge(), QLabel(), muted_label()
            self.gauges.addWidget(name, 2 * row, 0)
            self.gauges.addWidget(gauge, 2 * row, 1)
            self.gauges.addWidget(verdict, 2 * row, 2)
            self.gauges.addWidget(hint, 2 * row + 1, 0, 1, 3)
            self.gauge_rows.append((name, gauge, verdict, hint))
        for (name, gauge, verdict, hint), d in zip(self.gauge_rows, datasets):
            name.setText(Path(d.path).name or d.path)
            counts = _count(d.images, "image") if d.unit == "image" else f"{_count(d.clips, 'clip')}, {_count(d.images, 'image')}"
            name.setToolTip(f"{d.path}\nrepeats {d.repeats}: {counts} to train on")
            if d.rating:
                gauge.set_times_seen(d.times_seen)
                verdict.setText(f'<span style="color:{rating_colour(d.rating).name()}">about {_times(d.times_seen)}x: <b>{d.rating}</b></span>')
            else:
                gauge.set_times_seen(None)
                verdict.setText("nothing to train")
            hint.setText(d.hint)
            hint.setVisible(bool(d.hint))

    def _show_problems(self, report: DatasetReport | None) -> None:
        issues = [i for i in (report.issues if report else []) if str(i.path) != "datasets"]
        roots = [Path(d.path) for d in report.datasets] if report else []
        rows = [
            ([shown_path(i.path, roots), i.reason], f"{i.path}\n{i.reason}" + ("" if i.fatal else "\n(a warning: the file is still used)"),
             FATAL_COLOUR if i.fatal else None)
            for i in issues
        ]
        _fill(self.problems_table, rows)
        fatal = sum(1 for i in issues if i.fatal)
        self.problems_title.setText(f"Problems ({fatal} left out, {len(issues) - fatal} warnings)" if issues else "Problems")
        self.problems_title.setVisible(bool(issues))
