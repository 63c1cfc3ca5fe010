"""The dataset editor's list of clips as a Qt model, and the filter over it.

The model holds core.data.clip_list.ClipEntry rows and the thumbnails that have arrived; the text
of each cell is made once per entry (not at every paint), so a view of a thousand clips scrolls and
lays out without work per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import (
    QAbstractListModel,
    QModelIndex,
    QPersistentModelIndex,
    QSize,
    QSortFilterProxyModel,
    Qt,
)
from PySide6.QtGui import QColor, QImage

from core.data.clip_list import ClipEntry

ENTRY_ROLE = Qt.ItemDataRole.UserRole + 1
FATAL_COLOUR = QColor("#c9302c")
WARNING_COLOUR = QColor("#a15c00")

Index = QModelIndex | QPersistentModelIndex


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def cell_text(entry: ClipEntry) -> str:
    """Two lines under a thumbnail: the file name; duration, size and bucket (or what is wrong)."""
    facts = []
    if entry.kind == "video" and entry.duration is not None:
        facts.append(_seconds(entry.duration))
    if entry.width is not None and entry.height is not None:
        facts.append(f"{entry.width}x{entry.height}")
    if entry.bucket is not None:
        facts.append(f"-> {entry.bucket}")
    if entry.fatal:
        facts.append("left out")
    elif not entry.has_caption:
        facts.append("no caption")
    return f"{entry.path.name}\n{'  '.join(facts) or ('image' if entry.kind == 'image' else 'clip')}"


def cell_tooltip(entry: ClipEntry) -> str:
    lines = [str(entry.path)]
    if entry.bucket is not None:
        lines.append(f"bucket {entry.bucket} (frames x height x width)")
    lines.append(f"caption: {entry.caption_path}" if entry.has_caption else f"no caption yet: {entry.caption_path.name} would hold it")
    if entry.problems:
        lines.append(entry.problem_text())
    return "\n".join(lines)


class ClipModel(QAbstractListModel):
    def __init__(self, placeholder: QImage, parent: Any = None) -> None:
        super().__init__(parent)
        self.entries: list[ClipEntry] = []
        self._texts: list[str] = []
        self._tips: list[str] = []
        self._rows: dict[Path, int] = {}
        self.thumbnails: dict[Path, QImage] = {}
        self.placeholder = placeholder

    def set_entries(self, entries: list[ClipEntry]) -> None:
        """Show these entries; thumbnails already here for the same files are kept."""
        self.beginResetModel()
        self.entries = list(entries)
        self._texts = [cell_text(e) for e in self.entries]
        self._tips = [cell_tooltip(e) for e in self.entries]
        self._rows = {e.path: row for row, e in enumerate(self.entries)}
        self.thumbnails = {p: image for p, image in self.thumbnails.items() if p in self._rows}
        self.endResetModel()

    def update_entry(self, entry: ClipEntry) -> None:
        row = self._rows.get(entry.path)
        if row is None:
            return
        self.entries[row] = entry
        self._texts[row], self._tips[row] = cell_text(entry), cell_tooltip(entry)
        index = self.index(row)
        self.dataChanged.emit(index, index)

    def set_thumbnail(self, path: Path, image: QImage) -> None:
        row = self._rows.get(path)
        if row is None:
            return
        self.thumbnails[path] = image
        index = self.index(row)
        self.dataChanged.emit(index, index, [Qt.ItemDataRole.DecorationRole])

    def row_of(self, path: Path) -> int | None:
        return self._rows.get(path)

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802 (Qt's name)
        return 0 if parent.isValid() else len(self.entries)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        row = index.row()
        if role == Qt.ItemDataRole.DisplayRole:
            return self._texts[row]
        if role == Qt.ItemDataRole.DecorationRole:
            return self.thumbnails.get(self.entries[row].path, self.placeholder)
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tips[row]
        if role == Qt.ItemDataRole.ForegroundRole:
            entry = self.entries[row]
            if entry.fatal:
                return FATAL_COLOUR
            return WARNING_COLOUR if entry.problems or not entry.has_caption else None
        if role == ENTRY_ROLE:
            return self.entries[row]
        return None


class ClipFilter(QSortFilterProxyModel):
    """Shows all clips, or only those with no caption and/or those with problems (either, when both)."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.no_caption = False
        self.has_problems = False

    def set_filters(self, *, no_caption: bool, has_problems: bool) -> None:
        if hasattr(self, "beginFilterChange"):  # Qt 6.10 and later; invalidateFilter is deprecated there
            self.beginFilterChange()
            self.no_caption, self.has_problems = no_caption, has_problems
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self.no_caption, self.has_problems = no_caption, has_problems
            self.invalidateFilter()

    def filterAcceptsRow(self, source_row: int, source_parent: Index) -> bool:  # noqa: N802 (Qt's name)
        if not (self.no_caption or self.has_problems):
            return True
        model = self.sourceModel()
        assert isinstance(model, ClipModel)
        entry = model.entries[source_row]
        return (self.no_caption and not entry.has_caption) or (self.has_problems and bool(entry.problems))


def placeholder_image(size: QSize) -> QImage:
    """The grey cell a thumbnail takes until it has arrived."""
    image = QImage(size, QImage.Format.Format_RGB32)
    image.fill(QColor("#3a3a3a"))
    return image
