"""The options of one dataset folder (repeats, caption prefix and separator, caption dropout, loss
weight) as a row of widgets, each made from its declaration in the schema's `dataset` section.

Every edit writes the whole `datasets` list back through ConfigState.edit (which validates it), with
the other folders and the other keys of this one as they were.
"""

from __future__ import annotations

import copy
from typing import Any

from PySide6.QtCore import QSignalBlocker, Signal
from PySide6.QtWidgets import QDoubleSpinBox, QFormLayout, QLineEdit, QSpinBox, QWidget

from core.config.fields import FLOAT, INT, STR, Setting
from core.config.schema import DATASET
from core.config.settings import fill_item

from .config_state import ConfigState
from .labels import wrapped_tooltip
from .setting_fields import setting_tooltip

OPTION_NAMES = ("repeats", "caption_prefix", "caption_separator", "caption_dropout", "loss_weight")


def _setting(name: str) -> Setting:
    child = DATASET.child(name)
    assert isinstance(child, Setting), name
    return child


class DatasetOptions(QWidget):
    """Edits datasets[index]'s options; `set_index(i)` picks the folder (None: nothing to edit)."""

    changed = Signal()

    def __init__(self, state: ConfigState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.index: int | None = None
        self.widgets: dict[str, QWidget] = {}
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        for name in OPTION_NAMES:
            setting = _setting(name)
            widget = self._widget(name, setting)
            widget.setToolTip(wrapped_tooltip(setting_tooltip(f"datasets[].{name}", setting)))
            form.addRow(setting.title, widget)
            self.widgets[name] = widget
        self.setEnabled(False)

    def _widget(self, name: str, setting: Setting) -> QWidget:
        if setting.kind == INT:
            spin = QSpinBox()
            spin.setRange(int(setting.minimum or 0), int(setting.maximum or 2**31 - 1))
            spin.valueChanged.connect(lambda value, name=name: self._edit(name, int(value)))
            return spin
        if setting.kind == FLOAT:
            number = QDoubleSpinBox()
            number.setDecimals(3)
            number.setSingleStep(0.05)
            number.setRange(float(setting.minimum or 0.0), float(setting.maximum or 1e9))
            number.valueChanged.connect(lambda value, name=name: self._edit(name, float(value)))
            return number
        assert setting.kind == STR, (name, setting.kind)
        line = QLineEdit()
        if name == "caption_prefix":
            line.setPlaceholderText("a trigger word, e.g. ohwx")
        line.editingFinished.connect(lambda name=name, line=line: self._edit(name, line.text()))
        return line

    def set_index(self, index: int | None) -> None:
        self.index = index
        self.refresh()

    def refresh(self) -> None:
        """Show the folder's values from the config, without writing them back."""
        item = self._item()
        self.setEnabled(item is not None)
        values = item if item is not None else fill_item(self._list_setting(), {})
        for name, widget in self.widgets.items():
            blocker = QSignalBlocker(widget)
            value = values.get(name)
            if isinstance(widget, QSpinBox):
                widget.setValue(int(value))
            elif isinstance(widget, QDoubleSpinBox):
                widget.setValue(float(value))
            elif isinstance(widget, QLineEdit) and widget.text() != str(value):
                widget.setText(str(value))
            blocker.unblock()

    def _list_setting(self) -> Any:
        from core.config.settings import lookup

        return lookup("datasets")

    def _item(self) -> dict[str, Any] | None:
        datasets = self.state.config.get("datasets") or []
        if self.index is None or not 0 <= self.index < len(datasets):
            return None
        return fill_item(self._list_setting(), datasets[self.index])

    def _edit(self, name: str, value: Any) -> None:
        datasets = copy.deepcopy(self.state.config.get("datasets") or [])
        if self.index is None or not 0 <= self.index < len(datasets) or datasets[self.index].get(name) == value:
            return
        datasets[self.index][name] = value
        self.state.edit("datasets", datasets)
        self.changed.emit()
