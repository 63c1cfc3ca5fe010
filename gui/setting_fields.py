"""One editor widget per setting, chosen by the setting's kind and bound to a ConfigState.

A field writes every user edit through ConfigState.edit (which validates it) and shows the config's
value again on refresh() with its signals blocked, so a refresh never loops back into an edit.
"""

from __future__ import annotations

import abc
import math
import os
from decimal import Decimal
from typing import Any

from PySide6.QtCore import QSignalBlocker, Qt
from PySide6.QtGui import QWheelEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLineEdit,
    QMenu,
    QPlainTextEdit,
    QSpinBox,
    QToolButton,
    QWidget,
)

from core.config.fields import (
    BOOL,
    CHOICE,
    FLOAT,
    INT,
    PATH,
    PATH_FILE,
    PATH_FOLDER,
    PATH_MODEL,
    PATH_OUTPUT,
    STR,
    STR_LIST,
    Setting,
)
from core.config.settings import get_value

from .config_state import ConfigState
from .labels import wrapped_tooltip

INT32_MAX = 2**31 - 1
NUMBER_WIDTH = 180  # numbers and short choices do not need the full width of the form
INVALID_PROPERTY = "invalid"


def setting_tooltip(key: str, setting: Setting) -> str:
    return f"{setting.help}\n\nAllowed: {setting.allowed()}.\nKey: {key}"


def format_number(value: float | int | None) -> str:
    """Numbers as people type them: 0.00005 rather than 5e-05, 16.0 as 16.0."""
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    if value != 0 and 1e-9 <= abs(value) < 1e-4:
        return format(Decimal(repr(value)), "f")
    return repr(value)


def parse_number(text: str, setting: Setting) -> float | int | None:
    """The value typed into a number field; raises ValueError for text that is not a number."""
    text = text.strip()
    if not text and setting.nullable:
        return None
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(text)
    if setting.kind == INT:
        if not number.is_integer():
            raise ValueError(text)
        return int(number)
    return number


# The red mark of a wrong value, as a style sheet of that widget alone: a style sheet on the whole
# window would re-polish every widget of it at start-up (about 30 ms before the first paint).
_INVALID_BOX = "border: 1px solid #d9534f; border-radius: 3px; background-color: #fff4f4; color: #222;"
# By Qt class name (QObject.inherits): naming QTableWidget's Python class here would make PySide
# build it, and its bases, before the first paint (about 1.5 ms), for a table no first frame shows.
_INVALID_STYLES: tuple[tuple[str, str], ...] = (
    ("QAbstractSpinBox", "QAbstractSpinBox { background-color: #ffe3e3; color: #222; }"),
    ("QCheckBox", "QCheckBox { color: #c9302c; }"),
    ("QLineEdit", f"QLineEdit {{ {_INVALID_BOX} }}"),
    ("QPlainTextEdit", f"QPlainTextEdit {{ {_INVALID_BOX} }}"),
    ("QComboBox", f"QComboBox {{ {_INVALID_BOX} }}"),
    ("QTableWidget", f"QTableWidget {{ {_INVALID_BOX} }}"),
)


def invalid_style(widget: QWidget) -> str:
    """The style sheet that marks this widget's value as wrong."""
    return next((css for kind, css in _INVALID_STYLES if widget.inherits(kind)), f"* {{ {_INVALID_BOX} }}")


def mark_invalid(widget: QWidget, invalid: bool) -> None:
    """Switch the red mark on or off for this widget (its `invalid` property tells tests which)."""
    if bool(widget.property(INVALID_PROPERTY)) == invalid:
        return
    widget.setProperty(INVALID_PROPERTY, invalid)
    widget.setStyleSheet(invalid_style(widget) if invalid else "")


class _NoWheelSpinBox(QSpinBox):
    """Ignores the mouse wheel unless focused, so scrolling a long form does not change values."""

    def wheelEvent(self, event: QWheelEvent) -> None:  # noqa: N802 (Qt's name)
        if self.hasFocus():
            super().wheelEvent(event)
        else:
            event.ignore()


class _NoWheelComboBox(QComboBox):
    def wheelEvent(self, event: QWheelEvent) -> None:  # noqa: N802
        if self.hasFocus():
            super().wheelEvent(event)
        else:
            event.ignore()


class SettingField(abc.ABC):
    """The editor of one setting: `widget` goes into the form, `editor` is what gets marked."""

    def __init__(self, key: str, setting: Any, state: ConfigState) -> None:
        self.key = key
        self.setting = setting
        self.state = state
        self.editor: QWidget = self._build()
        self.widget: QWidget = self._container()
        self.tooltip = setting_tooltip(key, setting) if isinstance(setting, Setting) else setting.help
        self.widget.setToolTip(wrapped_tooltip(self.tooltip))
        self.editor.setToolTip(wrapped_tooltip(self.tooltip))
        self.refresh()

    @abc.abstractmethod
    def _build(self) -> QWidget:
        """The editing widget of this kind of setting."""

    def _container(self) -> QWidget:
        return self.editor

    @abc.abstractmethod
    def _show(self, value: Any) -> None:
        """Put value into the widget (signals are blocked by the caller)."""

    def refresh(self) -> None:
        """Show the config's value, without emitting edits."""
        blocker = QSignalBlocker(self.editor)
        try:
            self._show(get_value(self.state.config, self.key))
        finally:
            blocker.unblock()

    def marked_widget(self) -> QWidget:
        """The widget that gets the red border of a wrong value."""
        return self.editor

    def show_problem(self, message: str | None) -> None:
        mark_invalid(self.marked_widget(), message is not None)
        tooltip = wrapped_tooltip(f"{message}\n\n{self.tooltip}" if message else self.tooltip)
        self.editor.setToolTip(tooltip)
        self.marked_widget().setToolTip(tooltip)

    def _edit(self, value: Any) -> None:
        self.state.edit(self.key, value)


class BoolField(SettingField):
    def _build(self) -> QWidget:
        box = QCheckBox()
        box.toggled.connect(self._edit)
        return box

    def _show(self, value: Any) -> None:
        self.editor.setChecked(bool(value))


class IntField(SettingField):
    def _build(self) -> QWidget:
        spin = _NoWheelSpinBox()
        lo, hi = self.setting.minimum, self.setting.maximum
        spin.setRange(int(lo) if lo is not None else -INT32_MAX, int(hi) if hi is not None else INT32_MAX)
        spin.setMaximumWidth(NUMBER_WIDTH)
        spin.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        spin.valueChanged.connect(self._edit)
        return spin

    def _show(self, value: Any) -> None:
        self.editor.setValue(int(value))


class NumberField(SettingField):
    """Floats (and nullable integers) as text: tiny learning rates stay readable and exact, and an
    empty field means null where the setting allows it."""

    def _build(self) -> QWidget:
        edit = QLineEdit()
        edit.setMaximumWidth(NUMBER_WIDTH)
        if self.setting.nullable:
            edit.setPlaceholderText(self.setting.null_label or "empty")
        edit.textEdited.connect(self._typed)
        edit.editingFinished.connect(self._finished)
        return edit

    def _typed(self, text: str) -> None:
        try:
            value = parse_number(text, self.setting)
        except ValueError:
            self.state.reject_input(self.key, f"'{self.key}' must be {self.setting.allowed()}, not '{text.strip()}'")
            return
        self._edit(value)

    def _finished(self) -> None:
        # Tidy what was typed ("5e-5" becomes "0.00005") once it is a valid value.
        if self.state.problem_for(self.key) is None:
            self.refresh()

    def _show(self, value: Any) -> None:
        self.editor.setText(format_number(value))


class ChoiceField(SettingField):
    def _build(self) -> QWidget:
        combo = _NoWheelComboBox()
        combo.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self._values = ([None] if self.setting.nullable else []) + list(self.setting.choices)
        combo.addItems(["(none)" if v is None else str(v) for v in self._values])
        combo.setMinimumContentsLength(10)
        combo.setMaximumWidth(max(NUMBER_WIDTH, combo.sizeHint().width()))
        combo.currentIndexChanged.connect(lambda i: self._edit(self._values[i]) if i >= 0 else None)
        return combo

    def _show(self, value: Any) -> None:
        self.editor.setCurrentIndex(self._values.index(value) if value in self._values else -1)


class TextField(SettingField):
    def _build(self) -> QWidget:
        edit = QLineEdit()
        edit.textEdited.connect(lambda text: self._edit(None if text == "" and self.setting.nullable else text))
        return edit

    def _show(self, value: Any) -> None:
        self.editor.setText("" if value is None else str(value))
        self.editor.setCursorPosition(0)  # show the start of a long path, not its end


class PathField(TextField):
    """A line edit (paths and hub ids can be typed or pasted) with a '...' button for a dialog."""

    def _container(self) -> QWidget:
        box = QWidget()
        row = QHBoxLayout(box)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.editor, 1)
        button = QToolButton()
        button.setText("...")
        kind = self.setting.path_kind
        if kind in (PATH_MODEL, PATH_OUTPUT):
            # A model is a folder or a checkpoint file; an output is a file (LoRA) or a folder (fine-tune).
            menu = QMenu(button)
            menu.addAction("Choose a folder...", self.choose_folder)
            menu.addAction("Choose a file...", self.choose_save_file if kind == PATH_OUTPUT else self.choose_file)
            button.setMenu(menu)
            button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        elif kind == PATH_FILE:
            button.clicked.connect(self.choose_file)
        else:
            button.clicked.connect(self.choose_folder)
        button.setToolTip(f"Choose {self.setting.allowed()}")
        row.addWidget(button)
        self.button = button
        return box

    def _start_dir(self) -> str:
        current = os.path.expanduser(self.editor.text().strip())
        while current and not os.path.isdir(current):
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
        return current if current and os.path.isdir(current) else os.path.expanduser("~")

    # QFileDialog is imported when a dialog is asked for: its Python class is not made before the first paint.
    def choose_folder(self) -> None:
        from PySide6.QtWidgets import QFileDialog

        self._chosen(QFileDialog.getExistingDirectory(self.widget, self.setting.title, self._start_dir()))

    def choose_file(self) -> None:
        from PySide6.QtWidgets import QFileDialog

        self._chosen(QFileDialog.getOpenFileName(self.widget, self.setting.title, self._start_dir())[0])

    def choose_save_file(self) -> None:
        from PySide6.QtWidgets import QFileDialog

        name, _ = QFileDialog.getSaveFileName(
            self.widget, self.setting.title, self._start_dir(), "Safetensors (*.safetensors);;All files (*)"
        )
        self._chosen(name)

    def _chosen(self, path: str) -> None:
        if path:  # empty when the dialog was cancelled
            self.editor.setText(path)
            self._edit(path)


class ListField(SettingField):
    """A list of strings, one per line; blank lines are left out."""

    def _build(self) -> QWidget:
        edit = QPlainTextEdit()
        edit.setTabChangesFocus(True)
        edit.setPlaceholderText("one per line")
        line = edit.fontMetrics().lineSpacing()
        edit.setFixedHeight(line * 5 + 12)
        edit.textChanged.connect(lambda: self._edit(self.lines()))
        return edit

    def lines(self) -> list[str]:
        return [line.strip() for line in self.editor.toPlainText().splitlines() if line.strip()]

    def _show(self, value: Any) -> None:
        self.editor.setPlainText("\n".join(value or []))


_FIELDS: dict[str, type[SettingField]] = {
    BOOL: BoolField,
    INT: IntField,
    FLOAT: NumberField,
    CHOICE: ChoiceField,
    STR: TextField,
    PATH: PathField,
    STR_LIST: ListField,
}


def make_field(key: str, setting: Setting, state: ConfigState) -> SettingField:
    cls = _FIELDS[setting.kind]
    if setting.kind == INT and setting.nullable:
        cls = NumberField  # a spin box cannot be empty
    if setting.kind == PATH and setting.path_kind not in (PATH_FOLDER, PATH_FILE, PATH_MODEL, PATH_OUTPUT):
        cls = TextField
    return cls(key, setting, state)
