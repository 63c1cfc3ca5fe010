"""Presets: sparse JSON overlays on the defaults.

Bundled presets ship in the install's presets/ folder and are named with a leading '#'. The user's
own presets live in a per-user folder (core.paths.user_preset_dir) and never in the install folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.paths import bundled_preset_dir, user_preset_dir

from .files import read_config_file, write_config_file
from .settings import resolve, sparse

log = logging.getLogger(__name__)

BUNDLED_PREFIX = "#"
_FORBIDDEN_NAME_CHARS = set('/\\:*?"<>|')


@dataclass(frozen=True)
class PresetInfo:
    name: str
    path: Path
    bundled: bool
    description: str = ""
    model_type: str | None = None
    error: str | None = None  # why the file cannot be loaded; listed rather than hidden


def _scan(folder: Path, bundled: bool) -> list[PresetInfo]:
    if not folder.is_dir():
        return []
    infos = []
    for file in sorted(folder.glob("*.json"), key=lambda p: p.stem.lower()):
        name = file.stem
        if bundled != name.startswith(BUNDLED_PREFIX):
            continue  # a '#' file in the user folder could shadow a bundled preset
        try:
            overlay, description = read_config_file(file)
            infos.append(PresetInfo(name, file, bundled, description, overlay.get("model_type")))
        except ConfigError as e:
            infos.append(PresetInfo(name, file, bundled, error=str(e)))
    return infos


def list_presets() -> list[PresetInfo]:
    """Bundled presets first, then the user's own, each sorted by name."""
    return _scan(bundled_preset_dir(), True) + _scan(user_preset_dir(), False)


def find_preset(name_or_file: str) -> Path:
    """The file of a preset given by name ('#wan 2.2 LoRA', 'my preset') or by path."""
    candidate = Path(name_or_file).expanduser()
    if candidate.suffix.lower() == ".json" and (candidate.exists() or os.sep in name_or_file or "/" in name_or_file):
        return candidate
    stem = name_or_file[:-5] if name_or_file.lower().endswith(".json") else name_or_file
    folder = bundled_preset_dir() if stem.startswith(BUNDLED_PREFIX) else user_preset_dir()
    file = folder / f"{stem}.json"
    if file.exists():
        return file
    names = ", ".join(f"'{p.name}'" for p in list_presets()) or "none"
    raise ConfigError(
        f"no preset named '{name_or_file}'; the presets are: {names} (run 'presets list')",
        key="preset",
    )


def load_preset_overlay(name_or_file: str) -> dict[str, Any]:
    overlay, _ = read_config_file(find_preset(name_or_file))
    return overlay


def load_preset(name_or_file: str) -> dict[str, Any]:
    """The complete settings of a preset: the defaults with the preset merged on."""
    return open_preset(name_or_file).config


@dataclass(frozen=True)
class LoadedPreset:
    """A preset's complete settings and where they came from."""

    config: dict[str, Any] = field(repr=False)
    name: str  # the preset name, or the file name for a file outside the preset folders
    path: Path
    description: str = ""
    listed: bool = True  # a bundled or user preset (False for any other file)

    @property
    def bundled(self) -> bool:
        return self.listed and self.name.startswith(BUNDLED_PREFIX)

    @property
    def is_user_preset(self) -> bool:
        """Saving can write back to it; bundled presets and other files are saved under a new name."""
        return self.listed and not self.bundled


def open_preset(name_or_file: str) -> LoadedPreset:
    """Load a preset by name, or a preset or config file by path; raises ConfigError."""
    path = find_preset(name_or_file)
    overlay, description = read_config_file(path)
    config = resolve(overlay, source=str(path))
    folder = path.resolve().parent
    bundled_folder, user_folder = bundled_preset_dir().resolve(), user_preset_dir().resolve()
    listed = (folder == bundled_folder and path.stem.startswith(BUNDLED_PREFIX)) or (
        folder == user_folder and not path.stem.startswith(BUNDLED_PREFIX)
    )
    return LoadedPreset(config, path.stem if listed else path.name, path, description, listed)


def check_user_preset_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise ConfigError("a preset needs a name", key="preset")
    if name.startswith(BUNDLED_PREFIX):
        raise ConfigError(f"names starting with '{BUNDLED_PREFIX}' are kept for bundled presets; choose another name", key="preset")
    bad = sorted(set(name) & _FORBIDDEN_NAME_CHARS)
    if bad or name in (".", ".."):
        raise ConfigError(f"a preset name cannot contain {' '.join(bad) or name}; choose another name", key="preset")
    return name


def user_preset_path(name: str) -> Path:
    """Where the user preset of this name is (or would be) stored."""
    return user_preset_dir() / f"{check_user_preset_name(name)}.json"


def save_user_preset(name: str, config: dict[str, Any], description: str = "", *, overwrite: bool = False) -> Path:
    """Save the settings that differ from the defaults as the user's preset (atomically).

    An existing preset of the same name is replaced only with overwrite=True.
    """
    name = check_user_preset_name(name)
    path = user_preset_path(name)
    if path.exists() and not overwrite:
        raise ConfigError(f"a preset named '{name}' exists ({path}); choose another name or overwrite it", key="preset")
    write_config_file(path, sparse(config), description)
    log.info("saved preset %s to %s", name, path)
    return path


def delete_user_preset(name: str) -> None:
    path = user_preset_path(name)
    if not path.exists():
        raise ConfigError(f"no user preset named '{name}'", key="preset")
    path.unlink()
