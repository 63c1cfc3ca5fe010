"""The settings being edited in the window, the preset they came from, and what is wrong with them.

Widgets never keep their own copy of a value: every edit goes through ConfigState.edit, which
validates it against the schema (set_value) and re-runs the cross-field checks, so the window and
a later Start button see one config and one list of problems. Besides those (`problems()`: what
also stops saving a preset), the start check (gui/start_check.py: what a run would refuse, found on
a worker thread) adds its own (`start_blockers()`: what disables Start). Messages name the fields'
labels, not their keys (gui/labels.py).
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

from PySide6.QtCore import QObject, Signal

from core.config.settings import consistency_problems, defaults, set_value
from core.errors import ConfigError

from .labels import labelled


class Problem(NamedTuple):
    key: str
    message: str


def messages(problems: list[Problem]) -> list[str]:
    """The problems' messages, each once (a rule across settings is one problem per field it marks)."""
    return list(dict.fromkeys(p.message for p in problems))


class ConfigState(QObject):
    """The edited config; `edited(key)` after every change by a widget, `replaced()` after a load."""

    edited = Signal(str)
    replaced = Signal()
    problems_changed = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.config: dict[str, Any] = defaults()
        self.baseline: dict[str, Any] = copy.deepcopy(self.config)  # what "modified" compares with
        # Keys whose widget holds text that is not a valid value; the config keeps the last good one.
        self._input_errors: dict[str, str] = {}
        self._consistency: list[Problem] = []
        self._start: list[Problem] = []  # from the start check, for a recent config

    # -- changes -------------------------------------------------------------------------------

    def replace(self, config: dict[str, Any]) -> None:
        """Start over from a complete config (a loaded preset); it becomes the unmodified state."""
        self.config = copy.deepcopy(config)
        self.baseline = copy.deepcopy(config)
        self._input_errors.clear()
        self._check_consistency()
        self.replaced.emit()
        self.problems_changed.emit()

    def restore(self, config: dict[str, Any]) -> None:
        """Show a complete config as edits on top of the current baseline (the last settings used,
        over the preset they were based on): is_modified() tells them apart from it."""
        self.config = copy.deepcopy(config)
        self._input_errors.clear()
        self._check_consistency()
        self.replaced.emit()
        self.problems_changed.emit()

    def edit(self, key: str, value: Any) -> bool:
        """Set one setting from a widget; False (and a problem for key) if the value is not allowed."""
        try:
            set_value(self.config, key, value)
        except ConfigError as e:
            self._input_errors[key] = labelled(str(e))
            ok = False
        else:
            self._input_errors.pop(key, None)
            ok = True
        self._check_consistency()
        self.edited.emit(key)
        self.problems_changed.emit()
        return ok

    def reject_input(self, key: str, message: str) -> None:
        """A widget's text that cannot even be converted to a value (e.g. 'abc' in a number)."""
        self._input_errors[key] = labelled(message)
        self.edited.emit(key)
        self.problems_changed.emit()

    def drop_input_error(self, key: str) -> None:
        """Forget a widget's bad text, e.g. when its setting stops applying and is hidden."""
        if self._input_errors.pop(key, None) is not None:
            self.problems_changed.emit()

    def set_start_problems(self, problems: list[Problem]) -> None:
        """What the start check found for the current settings (messages already labelled)."""
        if problems != self._start:
            self._start = list(problems)
            self.problems_changed.emit()

    def mark_saved(self) -> None:
        self.baseline = copy.deepcopy(self.config)
        self.edited.emit("")

    # -- queries -------------------------------------------------------------------------------

    def is_modified(self) -> bool:
        return self.config != self.baseline or bool(self._input_errors)

    def problems(self) -> list[Problem]:
        """Everything that would stop a run: values that are not allowed, then cross-field rules."""
        out = [Problem(key, message) for key, message in self._input_errors.items()]
        return out + [p for p in self._consistency if p.key not in self._input_errors]

    def start_blockers(self) -> list[Problem]:
        """Everything that disables Start: problems(), then what the start check found (a run's own
        refusals, nothing to train on), without repeating one or marking a field that holds bad text."""
        out = self.problems()
        seen = set(out)
        for problem in self._start:
            if problem not in seen and problem.key not in self._input_errors:
                out.append(problem)
        return out

    def problem_for(self, key: str) -> str | None:
        for problem in self.start_blockers():
            if problem.key == key:
                return problem.message
        return None

    def _check_consistency(self) -> None:
        # A rule across settings marks every setting it involves.
        self._consistency = [Problem(key, labelled(str(e))) for e in consistency_problems(self.config) for key in e.keys]
