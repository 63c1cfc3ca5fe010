"""The bar above the tabs: the preset list, Load / Save / Save as, and the 'modified' marker.

The bar only shows and asks; the window does the loading and saving (signals below), so the
dialogs and the config stay in one place.

At start-up the list is made from the presets' file names only, before the window's first paint;
their contents (a description for the tooltip, or why one cannot be loaded, which disables it) are
read when the user first reaches for the list (a click, a key or the wheel on it), or when something
asks (is_enabled, refresh).
"""

from __future__ import annotations

import logging

from PySide6.QtCore import QEvent, QObject, Qt, Signal
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

from core.config.presets import PresetFile, list_preset_files, read_preset_info

from .side_panel import NOTE_COLOUR, set_text_colour

log = logging.getLogger(__name__)

NAME_ROLE = Qt.ItemDataRole.UserRole
# Events on the preset list by which the user reaches for it (QEvent.Type is made by any window anyway).
_REACHING = (QEvent.Type.MouseButtonPress, QEvent.Type.KeyPress, QEvent.Type.Wheel)


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
        self._unread: dict[str, tuple[int, PresetFile]] = {}  # listed, not read yet: name -> (row, file)
        self._fill(read=False)
        self.combo.installEventFilter(self)  # the user reaching for the list: read them first

    # -- the list ------------------------------------------------------------------------------

    def refresh(self, select: str | None = None) -> None:
        """Re-read the presets; keep (or set) the selection by name."""
        self._fill(select, read=True)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if watched is self.combo and event.type() in _REACHING:
            self._read_all()  # before the popup opens or a key moves the selection
            self.combo.removeEventFilter(self)  # from now on every refresh() reads them at once
        return False

    def _fill(self, select: str | None = None, *, read: bool) -> None:
        keep = self.selected_name() if select is None else select
        self.combo.blockSignals(True)
        try:
            self.combo.clear()
            self._unread = {}
            files = list_preset_files()
            bundled = [f for f in files if f.bundled]
            own = [f for f in files if not f.bundled]
            for file in bundled:
                self._add(file)
            if bundled and own:
                self.combo.insertSeparator(self.combo.count())
            for file in own:
                self._add(file)
            if read:
                self._read_all()
            self.combo.setCurrentIndex(self._index_of(keep) if keep else -1)
        finally:
            self.combo.blockSignals(False)
        self._update_buttons()

    def _add(self, file: PresetFile) -> None:
        self._unread[file.name] = (self.combo.count(), file)
        self.combo.addItem(file.name, file.name)

    def _read_all(self) -> None:
        for name in list(self._unread):
            self._read(name)

    def _read(self, name: str) -> None:
        """Read one listed preset: its description as the tooltip, or, if it cannot be loaded, why (disabled)."""
        index, file = self._unread.pop(name)
        info = read_preset_info(file)
        if info.error:
            model = self.combo.model()
            assert isinstance(model, QStandardItemModel)
            model.item(index).setEnabled(False)
            self.combo.setItemData(index, f"Cannot be loaded: {info.error}", Qt.ItemDataRole.ToolTipRole)
            log.warning("preset %s cannot be loaded: %s", info.name, info.error)
            if self.combo.currentIndex() == index:
                self.combo.setCurrentIndex(-1)  # as select() would have left it
        elif info.description:
            self.combo.setItemData(index, info.description, Qt.ItemDataRole.ToolTipRole)

    def _index_of(self, name: str) -> int:
        index = self.combo.findData(name, NAME_ROLE)
        if index < 0:
            return -1
        # A preset not read yet counts as loadable: the window selects the one it has just loaded.
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
        self._read_all()
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
