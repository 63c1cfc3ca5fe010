"""What the window remembers between starts: its geometry and dividers (window.ini) and the last
settings used (last_settings.json), both in the per-user state folder.

The last settings are the config in the window when it closed, saved or not, written like a preset
(sparse, with the format version, atomically) with the name of the preset they were based on. At the
next start that preset is loaded and the settings are put back on top of it, so the window shows
them as "modified" against it, exactly as it was left; a file from an older version is migrated as
presets are. Nothing is lost by closing, so closing does not ask about unsaved settings.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QMainWindow

from core.config.files import read_config_file, write_config_file
from core.config.settings import defaults, merge, sparse
from core.errors import ConfigError
from core.paths import user_state_dir

log = logging.getLogger(__name__)

LAST_SETTINGS_FILE = "last_settings.json"
BASED_ON_KEY = "__based_on"  # stored in the file's description slot: the preset the settings came from


def window_settings() -> QSettings:
    """Window state (geometry, dividers, last preset) in the per-user state folder, as an INI file."""
    folder = user_state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return QSettings(str(folder / "window.ini"), QSettings.Format.IniFormat)


def last_settings_path() -> Path:
    return user_state_dir() / LAST_SETTINGS_FILE


def save_last_settings(config: dict[str, Any], based_on: str | None) -> None:
    """Keep the window's settings for the next start; a failure is logged, never raised (closing must work)."""
    try:
        description = json.dumps({BASED_ON_KEY: based_on or ""})
        write_config_file(last_settings_path(), sparse(config), description)
    except (OSError, ValueError) as e:
        log.warning("the last settings could not be kept for the next start: %s", e)


def load_last_settings() -> tuple[dict[str, Any], str | None] | None:
    """(complete settings, name of the preset they were based on) from the last close; None if there
    are none or they no longer load (then the last preset alone is restored)."""
    path = last_settings_path()
    if not path.is_file():
        return None
    try:
        overlay, description = read_config_file(path)
    except ConfigError as e:
        log.warning("the last settings were not restored: %s", e)
        return None
    try:
        based_on = str(json.loads(description).get(BASED_ON_KEY) or "") or None
    except (ValueError, AttributeError):
        based_on = None
    # merge, not resolve: the settings may break a rule across settings (the window allows that while
    # editing, and marks it), and must come back as they were left.
    return merge(defaults(), overlay), based_on


def fit_and_center(window: QMainWindow) -> None:
    """First start: the default size, but no larger than most of a small laptop screen."""
    screen = window.screen().availableGeometry()
    window.resize(min(window.width(), int(screen.width() * 0.9)), min(window.height(), int(screen.height() * 0.9)))
    frame = window.frameGeometry()
    frame.moveCenter(screen.center())
    window.move(frame.topLeft())
