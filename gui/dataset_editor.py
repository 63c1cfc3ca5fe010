"""The dataset editor on the Data tab: one dataset folder's clips and images as a grid.

Each cell shows a thumbnail (a clip's first frame), the duration, the size and the bucket the clip
lands in (from the dataset doctor's report beside, which has probed the files) and is coloured when
the doctor or discovery found a problem (named in its tooltip and under the player). Clicking a
cell plays it in the sample player and puts its caption beside it, editable: Save (or moving to
another clip) writes it to the caption file atomically. Filters show the clips with no caption or
with problems; the folder's options (repeats, caption prefix, caption dropout, loss weight) are
above the grid. Folders dropped on the tab are added as datasets (gui.folder_drops).

The GUI thread never decodes nor walks a folder: listing runs on a BackgroundJob, thumbnails on
gui.thumbnails' pool; the grid takes them in batches.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QItemSelection, QModelIndex, QSignalBlocker, QSize, Qt, Signal
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QListView,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from core.data.clip_list import ClipEntry, list_clips, save_caption, with_report
from core.data.thumbnails import THUMBNAIL_BOX
from core.errors import UserError

from .background import BackgroundJob, JobControl
from .clip_model import ENTRY_ROLE, ClipFilter, ClipModel, placeholder_image
from .config_state import ConfigState
from .dataset_options import DatasetOptions
from .side_panel import PROBLEM_COLOUR, muted_label, set_text_colour, title_label
from .thumbnails import ThumbnailLoader
from .video_player import VideoPlayer

THUMB = QSize(*THUMBNAIL_BOX)
CELL = QSize(THUMBNAIL_BOX[0] + 24, THUMBNAIL_BOX[1] + 48)  # a thumbnail and two lines of text under it


def _list(folder: str, control: JobControl) -> tuple[list[ClipEntry], list[Any]]:
    control.check()
    return list_clips(Path(folder))


class DatasetEditor(QWidget):
    captions_changed = Signal()  # a caption file was written: the doctor's counts are out of date

    def __init__(self, state: ConfigState, loader: ThumbnailLoader | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.folder: str | None = None
        self.base_entries: list[ClipEntry] = []  # as listed, before the doctor's report is merged in
        self.report: Any = None  # the doctor's last DatasetReport
        self.current: ClipEntry | None = None
        self._needs_listing = False  # the folder changed while hidden: listed when shown
        self.loader = loader or ThumbnailLoader(parent=self)
        self.loader.ready.connect(self._thumbnail)
        self.job = BackgroundJob(_list, 0, "listing a dataset folder", self)
        self.job.finished_ok.connect(self._listed)
        self.job.failed.connect(lambda _folder, message: self._set_note(message, problem=True))

        self.model = ClipModel(placeholder_image(THUMB), self)
        self.filter = ClipFilter(self)
        self.filter.setSourceModel(self.model)
        self._build()
        state.edited.connect(lambda key: self.settings_changed() if key == "datasets" else None)
        state.replaced.connect(self.settings_changed)
        self.settings_changed()

    # -- the widgets -----------------------------------------------------------------------------

    def _build(self) -> None:
        self.dataset_box = QComboBox()
        self.dataset_box.setMinimumContentsLength(30)
        self.dataset_box.currentIndexChanged.connect(self._dataset_chosen)
        self.add_button = QPushButton("Add folder...")
        self.add_button.setToolTip("Add a folder of clips and captions (or drop folders on this tab)")
        self.add_button.clicked.connect(self.choose_folder)
        self.no_caption_box = QCheckBox("No caption")
        self.problems_box = QCheckBox("Has problems")
        for box in (self.no_caption_box, self.problems_box):
            box.toggled.connect(self._filters_changed)
        self.count_label = muted_label(wrap=False)
        top = QHBoxLayout()
        top.addWidget(title_label("Dataset editor"))
        top.addWidget(self.dataset_box, 1)
        top.addWidget(self.add_button)
        top.addSpacing(12)
        top.addWidget(QLabel("Show only:"))
        top.addWidget(self.no_caption_box)
        top.addWidget(self.problems_box)
        top.addWidget(self.count_label)

        self.grid = QListView()
        self.grid.setViewMode(QListView.ViewMode.IconMode)
        self.grid.setResizeMode(QListView.ResizeMode.Adjust)
        self.grid.setMovement(QListView.Movement.Static)
        self.grid.setUniformItemSizes(True)  # one size for all cells: laying out a thousand is instant
        self.grid.setLayoutMode(QListView.LayoutMode.Batched)
        self.grid.setBatchSize(200)
        self.grid.setIconSize(THUMB)
        self.grid.setGridSize(CELL)
        self.grid.setWordWrap(True)
        self.grid.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.grid.setModel(self.filter)
        self.grid.selectionModel().selectionChanged.connect(self._selection_changed)

        self.options = DatasetOptions(self.state)
        self.player = VideoPlayer()
        self.player.setText("Click a clip to play it")
        self.player.setMinimumHeight(160)
        self.info_label = muted_label()
        self.caption_edit = QPlainTextEdit()
        self.caption_edit.setPlaceholderText("The caption: what the clip shows")
        self.caption_edit.setEnabled(False)
        self.caption_edit.textChanged.connect(self._caption_typed)
        self.save_button = QPushButton("Save caption")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self.save_caption)
        self.revert_button = QPushButton("Revert")
        self.revert_button.setEnabled(False)
        self.revert_button.clicked.connect(self._revert)
        self.note_label = muted_label()
        buttons = QHBoxLayout()
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.revert_button)
        buttons.addWidget(self.note_label, 1)

        side = QWidget()
        column = QVBoxLayout(side)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self.options)
        column.addWidget(self.player, 3)
        column.addWidget(self.info_label)
        column.addWidget(self.caption_edit, 2)
        column.addLayout(buttons)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.setChildrenCollapsible(False)
        # The column scrolls when the tab is short: the editor must not make the window taller.
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(side)
        side.setMinimumHeight(360)
        self.splitter.addWidget(self.grid)
        self.splitter.addWidget(scroll)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 2)

        outer = QVBoxLayout(self)
        outer.setContentsMargins(12, 8, 12, 8)
        outer.addLayout(top)
        outer.addWidget(self.splitter, 1)

    # -- which folder ----------------------------------------------------------------------------

    def _paths(self) -> list[str]:
        return [str(d.get("path") or "") for d in self.state.config.get("datasets") or []]

    def settings_changed(self) -> None:
        """The datasets list may have changed: the folder list, this folder's options."""
        paths = self._paths()
        shown = [self.dataset_box.itemText(i) for i in range(self.dataset_box.count())]
        if paths != shown:
            keep = self.dataset_box.currentIndex()
            blocker = QSignalBlocker(self.dataset_box)
            self.dataset_box.clear()
            self.dataset_box.addItems(paths)
            index = keep if 0 <= keep < len(paths) else (0 if paths else -1)
            self.dataset_box.setCurrentIndex(index)
            blocker.unblock()
            self._dataset_chosen(index)
        else:
            self.options.refresh()

    def show_dataset(self, index: int) -> None:
        self.dataset_box.setCurrentIndex(index)

    def _dataset_chosen(self, index: int) -> None:
        paths = self._paths()
        self.options.set_index(index if 0 <= index < len(paths) else None)
        folder = paths[index] if 0 <= index < len(paths) else None
        if folder == self.folder:
            return
        self._save_if_edited()
        self.folder = folder
        self._show_entry(None)
        self.model.set_entries([])
        self.loader.cancel()
        self._update_count()
        if folder:
            self.reload()
        else:
            self._set_note("Add a folder of clips, or drop folders on this tab." if not paths else "")

    def reload(self) -> None:
        """List the folder again (files added or removed outside the app); hidden, when next shown
        (the window builds this tab's page after its first paint: no decoding for a tab not seen)."""
        self._needs_listing = False
        if not self.folder:
            return
        if not self.isVisible():
            self._needs_listing = True
            return
        self._set_note("Listing the folder...")
        self.job.request(os.path.expanduser(self.folder), now=True)

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        if self._needs_listing:
            self.reload()

    def choose_folder(self) -> None:
        start = os.path.expanduser(self.folder or "~")
        folder = QFileDialog.getExistingDirectory(self, "Add a dataset folder", start)
        if folder:
            self.add_folders([Path(folder)])

    def add_folders(self, folders: list[Path]) -> None:
        """Add folders to the datasets (those not there already) and show the last one."""
        from core.config.settings import fill_item, lookup

        datasets = copy.deepcopy(self.state.config.get("datasets") or [])
        known = {os.path.normpath(os.path.expanduser(str(d.get("path") or ""))) for d in datasets}
        added = [str(f) for f in folders if os.path.normpath(str(f)) not in known and Path(f).is_dir()]
        if not added:
            return
        datasets += [fill_item(lookup("datasets"), {"path": folder}) for folder in added]  # type: ignore[arg-type]
        self.state.edit("datasets", datasets)
        self.show_dataset(len(datasets) - 1)

    # -- the listing and the doctor's report -------------------------------------------------------

    def _listed(self, folder: str, result: tuple[list[ClipEntry], list[Any]]) -> None:
        if self.folder is None or os.path.expanduser(self.folder) != folder:
            return
        entries, rest = result
        self.base_entries = entries
        self._apply_entries()
        self._set_note("; ".join(i.reason for i in rest[:2]) if rest else "")
        # In the grid's order, so the first rows fill first. Every file is asked for again (a cached
        # thumbnail is only read), so one changed on disk since it was shown gets its new one.
        self.loader.request([e.path for e in entries])

    def set_report(self, _config: Any, report: Any) -> None:
        """The doctor's DatasetReport: durations, sizes, buckets and problems for the cells."""
        self.report = report
        if self.base_entries:
            self._apply_entries()

    def _apply_entries(self) -> None:
        entries = self.base_entries
        if self.report is not None:
            entries = with_report(entries, self.report.files, self.report.issues)
        selected = self.current.path if self.current is not None else None
        self.model.set_entries(entries)
        self._update_count()
        if selected is not None:
            self.select_clip(selected)

    def _thumbnail(self, path: Path, image: Any) -> None:
        self.model.set_thumbnail(path, image)

    # -- filters and selection -----------------------------------------------------------------

    def _filters_changed(self) -> None:
        self.filter.set_filters(no_caption=self.no_caption_box.isChecked(), has_problems=self.problems_box.isChecked())
        self._update_count()

    def _update_count(self) -> None:
        total, shown = self.model.rowCount(), self.filter.rowCount()
        self.count_label.setText(f"{shown} of {total}" if shown != total else f"{total} files")

    def shown_paths(self) -> list[Path]:
        """The files the grid shows now, in order (tests)."""
        return [self.filter.index(r, 0).data(ENTRY_ROLE).path for r in range(self.filter.rowCount())]

    def select_clip(self, path: Path) -> bool:
        row = self.model.row_of(Path(path))
        if row is None:
            return False
        index = self.filter.mapFromSource(self.model.index(row))
        if not index.isValid():
            return False
        self.grid.setCurrentIndex(index)
        return True

    def _selection_changed(self, _selected: QItemSelection, _deselected: QItemSelection) -> None:
        index: QModelIndex = self.grid.currentIndex()
        entry = index.data(ENTRY_ROLE) if index.isValid() else None
        if entry is not None and self.current is not None and entry.path == self.current.path:
            self.current = entry  # the same clip, refreshed by a report: keep what is typed
            self._show_info(entry)
            return
        self._save_if_edited()
        self._show_entry(entry)
        if entry is not None:
            self.player.play(entry.path)

    # -- the caption -----------------------------------------------------------------------------

    def _show_entry(self, entry: ClipEntry | None) -> None:
        self.current = entry
        blocker = QSignalBlocker(self.caption_edit)
        self.caption_edit.setPlainText(entry.caption if entry is not None else "")
        blocker.unblock()
        self.caption_edit.setEnabled(entry is not None)
        self._caption_typed()
        if entry is None:
            self.player.clear("Click a clip to play it")
            self.info_label.setText("")
        else:
            self._show_info(entry)

    def _show_info(self, entry: ClipEntry) -> None:
        where = entry.caption_path.name if entry.caption_path.parent == entry.path.parent else str(entry.caption_path)
        lines = [f"Caption file: {where}" + ("" if entry.has_caption else " (not there yet: Save makes it)")]
        if entry.problems:
            lines.append(entry.problem_text())
        self.info_label.setText("\n".join(lines))

    def edited(self) -> bool:
        return self.current is not None and self.caption_edit.toPlainText().strip() != self.current.caption

    def _caption_typed(self) -> None:
        self.save_button.setEnabled(self.edited())
        self.revert_button.setEnabled(self.edited())

    def _revert(self) -> None:
        self._show_entry(self.current)

    def save_caption(self) -> bool:
        """Write the caption being edited to its file; False (and the reason shown) if it failed."""
        entry = self.current
        if entry is None:
            return False
        had_caption = entry.has_caption
        try:
            saved = save_caption(entry, self.caption_edit.toPlainText())
        except UserError as e:
            self._set_note(str(e), problem=True)
            return False
        self.base_entries = [saved if e.path == saved.path else e for e in self.base_entries]
        self.current = saved
        self.model.update_entry(saved)
        self._caption_typed()
        self._show_info(saved)
        self._set_note(f"Saved {saved.caption_path.name}")
        if not had_caption:
            self._update_count()
            self.captions_changed.emit()
        return True

    def _save_if_edited(self) -> None:
        if self.edited():
            self.save_caption()

    def _set_note(self, text: str, *, problem: bool = False) -> None:
        self.note_label.setText(text)
        set_text_colour(self.note_label, PROBLEM_COLOUR if problem else self.palette().placeholderText().color().name())

    # -- life --------------------------------------------------------------------------------------

    def settle(self, timeout_ms: int = 30_000) -> bool:
        """Finish the listing and the thumbnails under way (tests, screenshots); False on timeout."""
        from PySide6.QtCore import QCoreApplication, QDeadlineTimer, QEventLoop

        if self._needs_listing and self.folder:  # hidden so far: list it now, as asked
            self._needs_listing = False
            self.job.request(os.path.expanduser(self.folder), now=True)
        if not self.job.wait(timeout_ms):
            return False
        deadline = QDeadlineTimer(timeout_ms)
        while self.loader.pending():
            if deadline.hasExpired():
                return False
            QCoreApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 20)
        return True

    def shutdown(self) -> None:
        self._save_if_edited()
        self.job.shutdown()
        self.loader.shutdown()
        self.player.shutdown()
