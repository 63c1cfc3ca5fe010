"""A form of settings bound to the schema: one tab's rows, groups and their visibility.

Settings become rows of a QFormLayout labelled with Setting.title; a Section becomes a titled group
(or, when it is the tab's only entry, the tab itself). Rows and groups whose applies_when does not
hold under the current config are hidden and come back when it holds again.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QVBoxLayout,
    QWidget,
)

from core.config.fields import Section, SectionList, Setting
from core.config.settings import applies_key, lookup

from .config_state import ConfigState
from .labels import wrapped_tooltip
from .setting_fields import SettingField, make_field

FORM_MAX_WIDTH = 820  # beyond this, rows get hard to follow from label to field


def _new_form() -> QFormLayout:
    form = QFormLayout()
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    form.setLabelAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
    form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.DontWrapRows)
    form.setHorizontalSpacing(14)
    form.setVerticalSpacing(8)
    return form


def _help_label(text: str) -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setForegroundRole(QPalette.ColorRole.PlaceholderText)  # quieter than the settings
    return label


class SettingsForm(QWidget):
    """The widgets of a list of schema entries (dotted keys of settings, lists or sections)."""

    def __init__(self, entries: tuple[str, ...] | list[str], state: ConfigState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.fields: dict[str, SettingField] = {}
        self._rows: dict[str, tuple[QFormLayout, QLabel]] = {}  # key -> its form and label
        self._groups: dict[str, QGroupBox] = {}  # section key -> its group box

        outer = QVBoxLayout(self)
        outer.setContentsMargins(16, 12, 16, 12)
        outer.setSpacing(12)
        content = QWidget()
        content.setMaximumWidth(FORM_MAX_WIDTH)
        column = QVBoxLayout(content)
        column.setContentsMargins(0, 0, 0, 0)
        column.setSpacing(14)
        # The content takes the width up to FORM_MAX_WIDTH; a wider window leaves space on the right.
        row = QHBoxLayout()
        row.addWidget(content, 1)
        row.addStretch(0)
        outer.addLayout(row)
        outer.addStretch(1)

        only_section = len(entries) == 1 and isinstance(lookup(entries[0]), Section)
        form: QFormLayout | None = None
        for entry in entries:
            node = lookup(entry)
            if isinstance(node, Section):
                form = None
                if only_section:
                    self._add_section_body(column, node, entry)
                else:
                    column.addWidget(self._group(node, entry))
            else:
                if form is None:
                    form = _new_form()
                    column.addLayout(form)
                self._add_row(form, entry, node)
        self._align_labels()

    # -- building ------------------------------------------------------------------------------

    def _group(self, section: Section, key: str) -> QGroupBox:
        box = QGroupBox(section.title)
        box.setToolTip(wrapped_tooltip(section.help))
        column = QVBoxLayout(box)
        column.setContentsMargins(12, 10, 12, 12)
        self._add_section_body(column, section, key)
        self._groups[key] = box
        return box

    def _add_section_body(self, column: QVBoxLayout, section: Section, key: str) -> None:
        column.addWidget(_help_label(section.help))
        form: QFormLayout | None = None
        for child in section.children:
            child_key = f"{key}.{child.name}"
            if isinstance(child, Section):
                form = None
                column.addWidget(self._group(child, child_key))
                continue
            if form is None:
                form = _new_form()
                column.addLayout(form)
            self._add_row(form, child_key, child)

    def _add_row(self, form: QFormLayout, key: str, node: Setting | SectionList) -> None:
        if isinstance(node, SectionList):
            from .dataset_table import DatasetsField  # its table classes: when the Data tab is built

            field: SettingField = DatasetsField(key, node, self.state)
        else:
            field = make_field(key, node, self.state)
        label = QLabel(node.title)
        label.setToolTip(wrapped_tooltip(field.tooltip))
        label.setBuddy(field.editor)
        form.addRow(label, field.widget)
        self.fields[key] = field
        self._rows[key] = (form, label)

    def _align_labels(self) -> None:
        """One field column for the whole tab: labels outside groups are widened by the groups' inset."""
        insets = {key: self._inset(key) for key in self._rows}
        column = max((label.sizeHint().width() + insets[key] for key, (_f, label) in self._rows.items()), default=0)
        for key, (_form, label) in self._rows.items():
            label.setMinimumWidth(column - insets[key])

    def _inset(self, key: str) -> int:
        """How far right of the tab's left edge the rows of the groups holding key start."""
        parts = key.split(".")
        inset = 0
        for i in range(1, len(parts)):
            box = self._groups.get(".".join(parts[:i]))
            if box is not None:
                inset += box.contentsMargins().left() + box.layout().contentsMargins().left()
        return inset

    # -- state ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Show the config in every widget (after a load), then visibility and problems."""
        for field in self.fields.values():
            field.refresh()
        self.update_state()

    def update_state(self) -> None:
        """Hide what does not apply, and mark what is wrong, under the current config."""
        config = self.state.config
        for key, box in self._groups.items():
            box.setVisible(applies_key(key, config))
        for key, field in self.fields.items():
            visible = applies_key(key, config)
            form, _label = self._rows[key]
            form.setRowVisible(field.widget, visible)
            if not visible and self.state.problem_for(key) is not None:
                # Bad text in a field that no longer applies cannot block a run: show the value again.
                self.state.drop_input_error(key)
                field.refresh()
            field.show_problem(self.state.problem_for(key))

    def show_problems(self) -> None:
        """Mark what is wrong now (the start check's findings arrive after the edit that caused them)."""
        for key, field in self.fields.items():
            field.show_problem(self.state.problem_for(key))

    def applies(self) -> bool:
        """Whether anything on this form applies (else its tab is hidden)."""
        return any(applies_key(key, self.state.config) for key in self.fields)
