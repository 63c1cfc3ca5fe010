"""Folders dropped on a widget (the Data tab): an event filter that accepts a drag holding local
folders and says which were dropped. Files and remote URLs are not accepted, so the cursor shows
at once that they would not be added."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QEvent, QMimeData, QObject, Signal
from PySide6.QtGui import QDragEnterEvent, QDragMoveEvent, QDropEvent
from PySide6.QtWidgets import QWidget


def dropped_folders(mime: QMimeData) -> list[Path]:
    """The local folders among a drag's URLs, in order."""
    if not mime.hasUrls():
        return []
    paths = [Path(url.toLocalFile()) for url in mime.urls() if url.isLocalFile()]
    return [p for p in paths if p.is_dir()]


class FolderDrops(QObject):
    """Install on a widget with `FolderDrops(widget)`; `dropped(list[Path])` for each drop of folders."""

    dropped = Signal(list)

    def __init__(self, widget: QWidget) -> None:
        super().__init__(widget)
        widget.setAcceptDrops(True)
        widget.installEventFilter(self)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        kind = event.type()
        if kind in (QEvent.Type.DragEnter, QEvent.Type.DragMove) and isinstance(event, (QDragEnterEvent, QDragMoveEvent)):
            if dropped_folders(event.mimeData()):
                event.acceptProposedAction()
            else:
                event.ignore()
            return True
        if kind == QEvent.Type.Drop and isinstance(event, QDropEvent):
            folders = dropped_folders(event.mimeData())
            if folders:
                event.acceptProposedAction()
                self.dropped.emit(folders)
            return True
        return False
