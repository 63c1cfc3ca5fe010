"""The samples beside the Sampling tab: the files under workspace_dir/samples, newest first, and a player.

The list is read from the folder when the panel is shown and when workspace_dir changes (samples of
earlier runs, or of a run started with `main.py train`); during a run the engine's on_sample (the
TrainThread's `sample` signal) adds each new file at the top. While the newest file is selected
the player follows: a new sample starts playing as soon as it is written.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices, QShowEvent
from PySide6.QtWidgets import (
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSplitter,
    QWidget,
)

from core.train.samples import (
    SAMPLES_DIR_NAME,  # standard library only: no torch (nor numpy) before the first paint
)

from .config_state import ConfigState
from .side_panel import SidePanel, muted_label
from .video_player import IMAGE_SUFFIXES, DecodedVideo, VideoPlayer

log = logging.getLogger(__name__)

SAMPLE_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".gif", *IMAGE_SUFFIXES)
# step-000250-0-a-cat.mp4: core.train.samples.sample_file_name; step-000250-w1-a-cat.mp4: asked_file_name
_NAME = re.compile(r"^step-(?P<step>\d+)-(?P<index>w?\d+)-(?P<slug>.*)$")
PATH_ROLE = Qt.ItemDataRole.UserRole


def samples_folder(config: dict[str, Any]) -> Path:
    return Path(os.path.expanduser(str(config.get("workspace_dir") or ""))) / SAMPLES_DIR_NAME


def describe(path: Path) -> str:
    """'step 250 · a cat' from step-000250-0-a-cat.mp4; other names as they are."""
    match = _NAME.match(path.stem)
    if not match:
        return path.name
    prompt = match["slug"].replace("-", " ")
    return f"step {int(match['step'])}  ·  #{match['index']}  ·  {prompt}"


def _home_short(folder: Path) -> str:
    """~/VideoTrainer/... rather than /home/name/VideoTrainer/...: shorter, and as the settings say it."""
    try:
        return "~/" + folder.relative_to(Path.home()).as_posix()
    except ValueError:
        return str(folder)


def list_samples(folder: Path) -> list[Path]:
    """Sample files in folder, newest first (by time written, then name); hidden temporaries left out."""
    try:
        entries = [e for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(SAMPLE_SUFFIXES)]
    except OSError:
        return []
    entries.sort(key=lambda e: (e.stat().st_mtime_ns, e.name), reverse=True)
    return [Path(e.path) for e in entries]


class SampleViewer(SidePanel):
    def __init__(self, state: ConfigState, parent: QWidget | None = None) -> None:
        # Not in a scroll area: the player and the list share what height there is, so the panel fits
        # the default 1120x800 window with a sample playing and its caption shown.
        super().__init__("Samples", parent, scroll=False)
        self.state = state
        self.folder: Path | None = None  # the folder listed
        self.follow_newest = True  # a new sample plays as soon as it arrives

        self.open_button = QPushButton("Open folder")
        self.open_button.setToolTip("Open the samples folder in the file manager")
        self.open_button.clicked.connect(self.open_folder)
        self.pause_button = QPushButton("Pause")
        self.pause_button.setCheckable(True)
        self.pause_button.setToolTip("Stop the sample on its current frame")
        self.pause_button.toggled.connect(self._pause_toggled)
        self.header.addWidget(self.pause_button)
        self.header.addWidget(self.open_button)

        self.player = VideoPlayer()
        self.player.loaded.connect(self._loaded)
        self.caption = muted_label()
        self.list = QListWidget()
        self.list.setMinimumHeight(48)
        self.list.setAlternatingRowColors(True)
        self.list.currentItemChanged.connect(self._selected)
        self.folder_label = muted_label()
        column = QSplitter(Qt.Orientation.Vertical)
        column.setChildrenCollapsible(False)
        column.addWidget(self.player)
        column.addWidget(self.list)
        column.setStretchFactor(0, 3)
        column.setStretchFactor(1, 1)
        column.setSizes([3000, 1000])  # in that proportion of whatever height the panel gets
        self.splitter = column
        self.body.addWidget(column, 1)
        self.body.addWidget(self.caption)
        self.body.addWidget(self.folder_label)
        self.state.edited.connect(self._edited)
        self.state.replaced.connect(self.settings_changed)

    # -- what the window uses --------------------------------------------------------------------

    def refresh(self) -> None:
        """List the samples folder of the settings' workspace_dir again."""
        self.show_folder(samples_folder(self.state.config))

    def show_folder(self, folder: Path) -> None:
        selected = self.selected_path()
        self.folder = folder
        files = list_samples(folder)
        shown = _home_short(folder)
        self.folder_label.setText(shown if files else f"No samples in {shown} yet.")
        self.folder_label.setToolTip(str(folder))
        self.list.blockSignals(True)  # the selection is restored below, not played again
        self.list.clear()
        for path in files:
            self.list.addItem(self._item(path))
        self.list.blockSignals(False)
        paths = [self.list.item(i).data(PATH_ROLE) for i in range(self.list.count())]
        if selected is not None and str(selected) in paths and not (self.follow_newest and paths[0] != str(selected)):
            self._set_row_quietly(paths.index(str(selected)))  # still there: it goes on playing
        elif files:
            self.follow_newest = True
            self.list.setCurrentRow(0)  # plays it
        else:
            self.player.clear("No sample yet: samples appear here as training writes them.")
            self.caption.setText("")

    def add_sample(self, path: str | Path, *, play: bool = False) -> None:
        """The engine wrote a sample (TrainThread.sample): list it first, play it if following (or
        with play: the sample window's, which the user is waiting for)."""
        path = Path(path)
        if play:
            self.follow_newest = True
        if self.folder is None or path.parent != self.folder:
            self.show_folder(path.parent)  # the run's workspace (its settings may differ from the tabs')
            return
        for row in reversed(range(self.list.count())):
            listed = self.list.item(row).data(PATH_ROLE)
            # Written again (same step and prompt): it moves to the top. Gone: a run from the start
            # moved an earlier run's samples into samples/earlier-<time>/.
            if listed == str(path) or not Path(listed).exists():
                self.list.takeItem(row)
        self.list.insertItem(0, self._item(path))
        self.folder_label.setText(_home_short(self.folder))
        if self.follow_newest:
            self._select_row(0, force=True)

    def run_started(self, config: dict[str, Any]) -> None:
        """A run starts: its samples go under its own workspace_dir."""
        folder = samples_folder(config)
        if folder != self.folder:
            self.show_folder(folder)

    def run_ended(self) -> None:
        """A run ended: list its folder again (a run from the start set the earlier samples aside)."""
        if self.folder is not None:
            self.show_folder(self.folder)

    def selected_path(self) -> Path | None:
        item = self.list.currentItem()
        return Path(item.data(PATH_ROLE)) if item is not None else None

    def open_folder(self) -> None:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.folder)))

    def settle(self, timeout_ms: int = 30_000) -> bool:
        return self.player.job.wait(timeout_ms)

    def shutdown(self) -> None:
        self.player.shutdown()

    # -- inside ----------------------------------------------------------------------------------

    def _item(self, path: Path) -> QListWidgetItem:
        item = QListWidgetItem(describe(path))
        item.setData(PATH_ROLE, str(path))
        item.setToolTip(str(path))
        return item

    def _select_row(self, row: int, *, force: bool) -> None:
        if self.list.currentRow() == row and force:
            self._selected(self.list.item(row), None)  # same row, new file: play it
        else:
            self.list.setCurrentRow(row)

    def _set_row_quietly(self, row: int) -> None:
        self.list.blockSignals(True)
        self.list.setCurrentRow(row)
        self.list.blockSignals(False)

    def _selected(self, item: QListWidgetItem | None, _previous: QListWidgetItem | None) -> None:
        if item is None:
            return
        self.follow_newest = self.list.row(item) == 0
        path = Path(item.data(PATH_ROLE))
        self.caption.setText(describe(path))
        self.player.play(path)

    def _loaded(self, video: DecodedVideo) -> None:
        if video.fps:
            cut = " (the first ones)" if video.cut else ""
            shape = f"{len(video.frames)} frames{cut} at {video.fps:.3g} fps, {video.width}x{video.height}"
        else:
            shape = f"still image, {video.width}x{video.height}"
        self.caption.setText(f"{describe(video.path)}\n{shape}")

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 (Qt's name)
        self._stale = True  # the folder is read again each time the tab opens: a CLI run may have added files
        super().showEvent(event)

    def _edited(self, key: str) -> None:
        if key == "workspace_dir":
            self.settings_changed()

    def _pause_toggled(self, paused: bool) -> None:
        self.pause_button.setText("Play" if paused else "Pause")
        self.player.set_paused(paused)
