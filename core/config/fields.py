"""The building blocks of the settings schema: one declaration per setting.

A Setting knows its type, default, allowed range or choices, one line of help, and when it applies.
Everything else (CLI parsing, preset validation, GUI widgets, tooltips, error messages) is derived
from these declarations, so adding a setting is one declaration plus its use.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from typing import Any


class SettingValueError(ValueError):
    """A value that does not fit its declaration; the message states what is allowed."""


# Kinds of setting. "path" values are strings with a path_kind saying what the GUI should pick.
BOOL, INT, FLOAT, STR, CHOICE, PATH, STR_LIST = "bool", "int", "float", "str", "choice", "path", "str_list"
PATH_FOLDER, PATH_FILE, PATH_MODEL, PATH_OUTPUT = "folder", "file", "model", "output"


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    path_kind: str | None = None
    # {"dotted.key": (allowed values,)}: the setting only means something when all hold.
    applies_when: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    label: str | None = None
    # What null means for a nullable setting, in a few words (shown in an empty field).
    null_label: str | None = None

    @property
    def title(self) -> str:
        return self.label or self.name.replace("_", " ").capitalize()

    def allowed(self) -> str:
        """The allowed values, in words, for messages and tooltips."""
        nul = " or null" if self.nullable else ""
        if self.kind == BOOL:
            return "true or false" + nul
        if self.kind == CHOICE:
            return "one of " + ", ".join(str(c) for c in self.choices or ()) + nul
        if self.kind in (INT, FLOAT):
            noun = "an integer" if self.kind == INT else "a number"
            if self.minimum is not None and self.maximum is not None:
                return f"{noun} from {_num(self.minimum)} to {_num(self.maximum)}{nul}"
            if self.minimum is not None:
                return f"{noun} of at least {_num(self.minimum)}{nul}"
            return noun + nul
        if self.kind == STR_LIST:
            return "a list of strings"
        if self.kind == PATH:
            return {
                PATH_FOLDER: "a folder path",
                PATH_FILE: "a file path",
                PATH_MODEL: "a model folder, a Hugging Face hub id, or a checkpoint file",
                PATH_OUTPUT: "an output path",
            }.get(self.path_kind or "", "a path") + nul
        return "a string" + nul

    def check(self, value: Any) -> Any:
        """Return value normalised to this setting's type, or raise SettingValueError."""
        if value is None:
            if self.nullable:
                return None
            raise SettingValueError(f"must be {self.allowed()}, not null")
        if self.kind == BOOL:
            if isinstance(value, bool):
                return value
        elif self.kind == INT:
            # JSON has one number type: 2.0 is accepted as 2, 2.5 is not.
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, int) and not isinstance(value, bool):
                return self._in_range(value)
        elif self.kind == FLOAT:
            if isinstance(value, int) and not isinstance(value, bool):
                try:
                    value = float(value)
                except OverflowError:  # an integer of hundreds of digits: beyond any range
                    raise SettingValueError(f"must be {self.allowed()}, not {shown_value(value)}") from None
            if isinstance(value, float) and math.isfinite(value):
                return self._in_range(value)
        elif self.kind == CHOICE:
            if value in (self.choices or ()) and type(value) is type(self.choices[0]):
                return value
            raise SettingValueError(f"must be {self.allowed()}, not {shown_value(value)}")
        elif self.kind in (STR, PATH):
            if isinstance(value, str):
                return value
        elif self.kind == STR_LIST:
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
        raise SettingValueError(f"must be {self.allowed()}, not {shown_value(value)}")

    def _in_range(self, value: float) -> float:
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            raise SettingValueError(f"must be {self.allowed()}, not {_num(value)}")
        return value


@dataclass(frozen=True)
class Section:
    """A named group of settings; its values form a JSON object."""

    name: str
    help: str
    children: tuple[Setting | Section | SectionList, ...]
    applies_when: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    label: str | None = None

    @property
    def title(self) -> str:
        return self.label or self.name.replace("_", " ").capitalize()

    def child(self, name: str) -> Setting | Section | SectionList | None:
        for c in self.children:
            if c.name == name:
                return c
        return None


@dataclass(frozen=True)
class SectionList:
    """A list of objects that share one Section as their item schema (e.g. dataset folders)."""

    name: str
    help: str
    item: Section
    default: tuple[dict[str, Any], ...] = ()
    min_items: int = 0
    applies_when: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    label: str | None = None

    @property
    def title(self) -> str:
        return self.label or self.name.replace("_", " ").capitalize()


def _num(x: float) -> str:
    if isinstance(x, int):
        return str(x) if abs(x) < 10**15 else shown_value(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


_SHOWN = reprlib.Repr()
# A value quoted in a message stays short, however long or deeply nested the file's value is.
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 80, 80, 40
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 3, 6, 4


def shown_value(value: Any) -> str:
    """value as repr() shows it, cut short (with ...) where it is long or deeply nested."""
    return _SHOWN.repr(value)


# Short constructors keep the schema readable as a table.
def boolean(name: str, default: bool, help: str, **kw: Any) -> Setting:
    return Setting(name, BOOL, default, help, **kw)


def integer(name: str, default: int | None, help: str, lo: int | None = None, hi: int | None = None, **kw: Any) -> Setting:
    return Setting(name, INT, default, help, minimum=lo, maximum=hi, **kw)


def number(name: str, default: float | None, help: str, lo: float | None = None, hi: float | None = None, **kw: Any) -> Setting:
    return Setting(name, FLOAT, default, help, minimum=lo, maximum=hi, **kw)


def choice(name: str, choices: tuple[Any, ...], default: Any, help: str, **kw: Any) -> Setting:
    assert default in choices, (name, default)
    return Setting(name, CHOICE, default, help, choices=choices, **kw)


def path(name: str, default: str, help: str, path_kind: str, **kw: Any) -> Setting:
    return Setting(name, PATH, default, help, path_kind=path_kind, **kw)


def string(name: str, default: str, help: str, **kw: Any) -> Setting:
    return Setting(name, STR, default, help, **kw)


def string_list(name: str, default: list[str], help: str, **kw: Any) -> Setting:
    return Setting(name, STR_LIST, tuple(default), help, **kw)
