"""The editor of a list of sections with a folder and a count (the `datasets` list).

A table of folder + repeats with Add folder... / Remove; any change writes the whole list back
through ConfigState.edit, which fills and validates each item against the schema.
"""

from __future__ import annotations

import os
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from core.config.fields import SectionList, Setting
from core.config.settings import fill_item

from .config_state import ConfigState
from .labels import wrapped_tooltip
from .setting_fields import SettingField, setting_tooltip

PATH_COLUMN, REPEATS_COLUMN = 0, 1


class DatasetsField(SettingField):
    """Rows of {path, repeats}; the column setup comes from the list's item section."""

    setting: SectionList

    def __init__(self, key: str, setting: SectionList, state: ConfigState) -> None:
        path = setting.item.child("path")
        repeats = setting.item.child("repeats")
        assert isinstance(path, Setting) and isinstance(repeats, Setting), "datasets items need path and repeats"
        self._path_setting, self._repeats_setting = path, repeats
        self._committing = False
        super().__init__(key, setting, state)
        # The dataset editor edits the list too (options, dropped folders): show its edits.
        state.edited.connect(lambda edited: self.refresh() if edited == key and not self._committing else None)

    def _build(self) -> QWidget:
        table = QTableWidget(0, 2)
        table.setHorizontalHeaderLabels([self._path_setting.title, self._repeats_setting.title])
        header = table.horizontalHeader()
        header.setSectionResizeMode(PATH_COLUMN, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(REPEATS_COLUMN, QHeaderView.ResizeMode.ResizeToContents)
        table.horizontalHeaderItem(PATH_COLUMN).setToolTip(wrapped_tooltip(setting_tooltip(f"{self.key}[].path", self._path_setting)))
        table.horizontalHeaderItem(REPEATS_COLUMN).setToolTip(
            wrapped_tooltip(setting_tooltip(f"{self.key}[].repeats", self._repeats_setting))
        )
        table.verticalHeader().setVisible(False)
        table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        table.setMinimumHeight(150)
        table.itemChanged.connect(lambda _item: self._commit())
        table.itemSelectionChanged.connect(self._selection_changed)
        return table

    def _container(self) -> QWidget:
        box = QWidget()
        column = QVBoxLayout(box)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self.editor)
        buttons = QHBoxLayout()
        self.add_button = QPushButton("Add folder...")
        self.add_button.setToolTip("Add a folder of clips and captions")
        self.add_button.clicked.connect(self.choose_folder)
        self.remove_button = QPushButton("Remove")
        self.remove_button.setToolTip("Remove the selected folders from the list (the files stay)")
        self.remove_button.setEnabled(False)
        self.remove_button.clicked.connect(self.remove_selected)
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        buttons.addStretch(1)
        column.addLayout(buttons)
        return box

    # -- actions -------------------------------------------------------------------------------

    def choose_folder(self) -> None:
        rows = self.rows()
        start = os.path.dirname(os.path.expanduser(rows[-1]["path"])) if rows and rows[-1]["path"] else os.path.expanduser("~")
        folder = QFileDialog.getExistingDirectory(self.widget, "Add a dataset folder", start)
        if folder:
            self.add_folder(folder)

    def add_folder(self, folder: str) -> None:
        self._commit(self.rows() + [fill_item(self.setting, {"path": folder})])
        self.refresh()

    def remove_selected(self) -> None:
        selected = {index.row() for index in self.editor.selectionModel().selectedRows()}
        self._commit([row for i, row in enumerate(self.rows()) if i not in selected])
        self.refresh()

    def _selection_changed(self) -> None:
        self.remove_button.setEnabled(bool(self.editor.selectionModel().selectedRows()))

    # -- table <-> config ----------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """The list as the table shows it, each folder's other options (not in the table) as they were."""
        current = self.state.config.get(self.key) or []
        out = []
        for row in range(self.editor.rowCount()):
            item = self.editor.item(row, PATH_COLUMN)
            spin = self.editor.cellWidget(row, REPEATS_COLUMN)
            kept = dict(current[row]) if row < len(current) else {}
            out.append({**kept, "path": item.text() if item else "", "repeats": spin.value() if spin else 1})
        return out

    def _commit(self, rows: list[dict[str, Any]] | None = None) -> None:
        self._committing = True
        try:
            self._edit(self.rows() if rows is None else rows)
        finally:
            self._committing = False

    def _show(self, value: Any) -> None:
        table: QTableWidget = self.editor
        table.setRowCount(0)
        for item in value or []:
            row = table.rowCount()
            table.insertRow(row)
            cell = QTableWidgetItem(str(item.get("path", "")))
            cell.setToolTip(cell.text())
            table.setItem(row, PATH_COLUMN, cell)
            spin = QSpinBox()
            spin.setRange(int(self._repeats_setting.minimum or 1), int(self._repeats_setting.maximum or 10_000))
            spin.setValue(int(item.get("repeats", 1)))
            spin.setFrame(False)
            spin.setAlignment(Qt.AlignmentFlag.AlignRight)
            spin.valueChanged.connect(lambda _v: self._commit())
            table.setCellWidget(row, REPEATS_COLUMN, spin)
        self._selection_changed()
