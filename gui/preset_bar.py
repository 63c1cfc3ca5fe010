"""The bar above the tabs: the preset list, Load / Save / Save as, and the 'modified' marker.

The bar only shows and asks; the window does the loading and saving (signals below), so the
dialogs and the config stay in one place.
"""

from __future__ import annotations

import logging

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QStandardItemModel
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from core.config.presets import PresetInfo, list_presets

from .side_panel import NOTE_COLOUR, set_text_colour

log = logging.getLogger(__name__)

NAME_ROLE = Qt.ItemDataRole.UserRole


class PresetBar(QWidget):
    load_requested = Signal(str)  # a preset name
    save_requested = Signal()
    save_as_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        column = QVBoxLayout(self)
        column.setContentsMargins(10, 8, 10, 4)
        column.setSpacing(4)
        row = QHBoxLayout()
        row.setSpacing(8)
        column.addLayout(row)
        # One line under the list (the first start's "Start trains the demo offline"); hidden when empty.
        self.note_label = QLabel()
        self.note_label.setObjectName("presetNote")
        self.note_label.setWordWrap(True)
        self.note_label.hide()
        column.addWidget(self.note_label)

        label = QLabel("Preset:")
        self.combo = QComboBox()
        self.combo.setPlaceholderText("choose a preset")
        self.combo.setMinimumContentsLength(28)
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.combo.setMaximumWidth(460)
        self.combo.currentIndexChanged.connect(self._update_buttons)
        self.combo.activated.connect(self._picked)
        label.setBuddy(self.combo)

        self.load_button = QPushButton("Load")
        self.load_button.setToolTip("Load the chosen preset again, replacing the settings (picking one in the list loads it too)")
        self.load_button.clicked.connect(self._load_clicked)
        self.save_button = QPushButton("Save")
        self.save_button.setToolTip("Save the settings into the loaded preset (bundled presets: under a new name)")
        self.save_button.clicked.connect(self.save_requested)
        self.save_as_button = QPushButton("Save as...")
        self.save_as_button.setToolTip("Save the settings as a new preset of your own")
        self.save_as_button.clicked.connect(self.save_as_requested)

        self.modified_label = QLabel("")
        self.modified_label.setObjectName("modified")
        set_text_colour(self.modified_label, NOTE_COLOUR)
        font = self.modified_label.font()
        font.setItalic(True)
        self.modified_label.setFont(font)

        row.addWidget(label)
        row.addWidget(self.combo, 1)
        row.addWidget(self.load_button)
        row.addWidget(self.save_button)
        row.addWidget(self.save_as_button)
        row.addSpacing(8)
        row.addWidget(self.modified_label)
        row.addStretch(1)
        self.refresh()

    # -- the list ------------------------------------------------------------------------------

    def refresh(self, select: str | None = None) -> None:
        """Re-read the presets; keep (or set) the selection by name."""
        keep = self.selected_name() if select is None else select
        self.combo.blockSignals(True)
        try:
            self.combo.clear()
            infos = list_presets()
            bundled = [p for p in infos if p.bundled]
            own = [p for p in infos if not p.bundled]
            for info in bundled:
                self._add(info)
            if bundled and own:
                self.combo.insertSeparator(self.combo.count())
            for info in own:
                self._add(info)
            self.combo.setCurrentIndex(self._index_of(keep) if keep else -1)
        finally:
            self.combo.blockSignals(False)
        self._update_buttons()

    def _add(self, info: PresetInfo) -> None:
        index = self.combo.count()
        self.combo.addItem(info.name, info.name)
        if info.error:
            model = self.combo.model()
            assert isinstance(model, QStandardItemModel)
            model.item(index).setEnabled(False)
            self.combo.setItemData(index, f"Cannot be loaded: {info.error}", Qt.ItemDataRole.ToolTipRole)
            log.warning("preset %s cannot be loaded: %s", info.name, info.error)
        elif info.description:
            self.combo.setItemData(index, info.description, Qt.ItemDataRole.ToolTipRole)

    def _index_of(self, name: str) -> int:
        index = self.combo.findData(name, NAME_ROLE)
        if index < 0:
            return -1
        model = self.combo.model()
        if isinstance(model, QStandardItemModel) and not model.item(index).isEnabled():
            return -1
        return index

    def names(self) -> list[str]:
        """The names listed, in order, without the separator."""
        out = []
        for i in range(self.combo.count()):
            name = self.combo.itemData(i, NAME_ROLE)
            if name:
                out.append(name)
        return out

    def is_enabled(self, name: str) -> bool:
        index = self.combo.findData(name, NAME_ROLE)
        model = self.combo.model()
        return index >= 0 and isinstance(model, QStandardItemModel) and model.item(index).isEnabled()

    def selected_name(self) -> str | None:
        name = self.combo.currentData(NAME_ROLE)
        return name or None

    def select(self, name: str | None) -> None:
        self.combo.setCurrentIndex(self._index_of(name) if name else -1)

    # -- marker and buttons --------------------------------------------------------------------

    def set_modified(self, modified: bool) -> None:
        self.modified_label.setText("modified" if modified else "")
        self.modified_label.setToolTip("The settings differ from the loaded preset" if modified else "")

    def _update_buttons(self, *_args: object) -> None:
        self.load_button.setEnabled(self.selected_name() is not None)

    def set_note(self, text: str) -> None:
        """One line under the preset list; an empty text hides it."""
        self.note_label.setText(text)
        self.note_label.setVisible(bool(text))

    def _picked(self, _index: int) -> None:
        # Picked from the list by the user (not set by the window): load it; the window asks first
        # if that would drop unsaved edits, and puts the selection back if the user says no.
        self._update_buttons()
        self._load_clicked()

    def _load_clicked(self) -> None:
        name = self.selected_name()
        if name:
            self.load_requested.emit(name)
