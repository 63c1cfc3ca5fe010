"""Where things live: the install folder and the per-user folders.

Per-user folders come from platformdirs so that nothing the user makes is written into the install
folder. VIDEO_TRAINER_HOME, when set, replaces all of them with subfolders of one root (used by
tests, portable installs and people who want everything in one place).
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "VideoTrainer"
HOME_ENV = "VIDEO_TRAINER_HOME"


def app_root() -> Path:
    """The install folder: the one holding main.py, presets/ and resources/."""
    return Path(__file__).resolve().parent.parent


def bundled_preset_dir() -> Path:
    return app_root() / "presets"


def resources_dir() -> Path:
    return app_root() / "resources"


def _user_dir(kind: str) -> Path:
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser() / kind
    import platformdirs

    if kind == "presets":
        return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "presets"
    if kind == "logs":
        return Path(platformdirs.user_log_dir(APP_NAME, appauthor=False))
    if kind == "state":
        return Path(platformdirs.user_state_dir(APP_NAME, appauthor=False))
    if kind == "cache":
        return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))
    raise ValueError(f"unknown user folder kind {kind!r}")


def user_preset_dir() -> Path:
    """Presets the user saved; listed beside the bundled ones."""
    return _user_dir("presets")


def user_log_dir() -> Path:
    """Log files, including errors from a window started without a console."""
    return _user_dir("logs")


def user_state_dir() -> Path:
    """Window geometry, the last settings used, and similar state."""
    return _user_dir("state")


def user_cache_dir() -> Path:
    """What can be made again and is kept only to be quick: the dataset editor's thumbnails."""
    return _user_dir("cache")


def shown_path(path: Path, roots: list[Path]) -> str:
    """path as the user knows it: relative to the first of roots (dataset folders) that holds it."""
    for root in roots:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            continue
    return str(path)
