"""Presets: sparse JSON overlays on the defaults.

Bundled presets ship in the install's presets/ folder and are named with a leading '#'. The user's
own presets live in a per-user folder (core.paths.user_preset_dir) and never in the install folder.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.paths import bundled_preset_dir, user_preset_dir

from .files import read_config_file, write_config_file
from .settings import resolve, sparse

log = logging.getLogger(__name__)

BUNDLED_PREFIX = "#"
# What the window loads at its very first start: trains the bundled tiny model on the bundled clips,
# offline, in a minute or two on a CPU.
DEMO_PRESET = "#demo tiny wan LoRA"
# A preset folder may be synced between Linux, macOS and Windows, so a name must make a file name on
# all of them: none of Windows' forbidden characters or reserved device names anywhere.
_FORBIDDEN_NAME_CHARS = frozenset('<>:"/\\|?*')
_RESERVED_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{device}{n}" for device in ("COM", "LPT") for n in [*"123456789", "\u00b9", "\u00b2", "\u00b3"]]
)
# File systems hold 255 bytes per name; the file is NAME.json, written through a temporary
# .NAME.json.XXXXXXXX.tmp (19 bytes more). 150 also keeps the whole path under Windows' 260
# characters in the usual per-user folder.
MAX_NAME_BYTES = 150


@dataclass(frozen=True)
class PresetInfo:
    name: str
    path: Path
    bundled: bool
    description: str = ""
    model_type: str | None = None
    error: str | None = None  # why the file cannot be loaded; listed rather than hidden


@dataclass(frozen=True)
class PresetFile:
    """A preset found by its file name, not read yet (read_preset_info reads it)."""

    name: str
    path: Path
    bundled: bool


def _files(folder: Path, bundled: bool) -> list[PresetFile]:
    if not folder.is_dir():
        return []
    files = []
    for file in sorted(folder.glob("*.json"), key=lambda p: p.stem.lower()):
        if bundled != file.stem.startswith(BUNDLED_PREFIX):
            continue  # a '#' file in the user folder could shadow a bundled preset
        files.append(PresetFile(file.stem, file, bundled))
    return files


def list_preset_files() -> list[PresetFile]:
    """Bundled presets first, then the user's own, each sorted by name, found by their file names
    without reading them (the window lists these before its first paint and reads them after)."""
    return _files(bundled_preset_dir(), True) + _files(user_preset_dir(), False)


def read_preset_info(file: PresetFile) -> PresetInfo:
    """The preset's description and model type, or why it cannot be loaded; never raises."""
    try:
        overlay, description = read_config_file(file.path)
        return PresetInfo(file.name, file.path, file.bundled, description, overlay.get("model_type"))
    except ConfigError as e:
        return PresetInfo(file.name, file.path, file.bundled, error=str(e))
    except Exception as e:  # a bug in reading one file must not hide the other presets
        log.exception("reading preset %s failed unexpectedly", file.path)
        error = f"{file.path}: cannot be read ({type(e).__name__}: {e}); details in the log"
        return PresetInfo(file.name, file.path, file.bundled, error=error)


def list_presets() -> list[PresetInfo]:
    """Bundled presets first, then the user's own, each sorted by name, each read and checked."""
    return [read_preset_info(file) for file in list_preset_files()]


def find_preset(name_or_file: str) -> Path:
    """The file of a preset given by name ('#wan 2.2 LoRA', 'my preset') or by path."""
    candidate = Path(name_or_file).expanduser()
    if candidate.suffix.lower() == ".json" and (_exists(candidate) or os.sep in name_or_file or "/" in name_or_file):
        return candidate
    stem = name_or_file[:-5] if name_or_file.lower().endswith(".json") else name_or_file
    folder = bundled_preset_dir() if stem.startswith(BUNDLED_PREFIX) else user_preset_dir()
    file = folder / f"{stem}.json"
    if _exists(file):
        return file
    names = ", ".join(f"'{p.name}'" for p in list_presets()) or "none"
    raise ConfigError(
        f"no preset named '{name_or_file}'; the presets are: {names} (run 'presets list')",
        key="preset",
    )


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system (Path.exists raises that one) is no file
        return False


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
    """The name, without surrounding spaces, if a user preset may have it; else a ConfigError saying why."""
    name = name.strip()
    problem = _name_problem(name)
    if problem:
        raise ConfigError(problem, key="preset")
    return name


def _name_problem(name: str) -> str | None:
    """Why a user preset cannot have this (stripped) name, with what to do; None if it can."""
    shown = name if len(name) <= 40 else name[:37] + "..."
    if not name:
        return "a preset needs a name; type one"
    if name.startswith(BUNDLED_PREFIX):
        return f"names starting with '{BUNDLED_PREFIX}' are kept for bundled presets; choose another name"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, as an undecodable command-line byte becomes
        return "a preset name must be readable text (this one holds bytes that are not UTF-8); type it again"
    if size > MAX_NAME_BYTES:
        return f"a preset name can be at most {MAX_NAME_BYTES} bytes in UTF-8 (this one is {size}); choose a shorter name"
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return "a preset name cannot contain control characters (tabs, line breaks); choose another name"
    bad = sorted(set(name) & _FORBIDDEN_NAME_CHARS)
    if bad:
        return f"a preset name cannot contain {' '.join(bad)} ('{shown}'; not allowed in Windows file names); choose another name"
    if name.endswith("."):
        return f"a preset name cannot end with a dot ('{shown}'; Windows drops it from file names); remove the dot"
    if name.lower().endswith(".json"):
        return f"'{shown}' ends with .json, which reads as a file name; leave the .json out"
    # Windows reserves these device names with any extension, and ignores spaces before the dot.
    if name.split(".", 1)[0].rstrip(" ").upper() in _RESERVED_NAMES:
        return f"'{shown}' is a device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9), which no file may have; choose another name"
    return None


def _same_but_case(name: str) -> str | None:
    """An existing user preset whose name differs from `name` only in case: one file on Windows and macOS."""
    folder = user_preset_dir()
    if not folder.is_dir():
        return None
    wanted = name.casefold()
    for file in folder.glob("*.json"):
        if file.stem != name and file.stem.casefold() == wanted:
            return file.stem
    return None


def user_preset_path(name: str) -> Path:
    """Where the user preset of this name is (or would be) stored."""
    return user_preset_dir() / f"{check_user_preset_name(name)}.json"


def save_user_preset(name: str, config: dict[str, Any], description: str = "", *, overwrite: bool = False) -> Path:
    """Save the settings that differ from the defaults as the user's preset (atomically).

    An existing preset of the same name is replaced only with overwrite=True.
    """
    name = check_user_preset_name(name)
    path = user_preset_path(name)
    other = _same_but_case(name)
    if other is not None:
        raise ConfigError(
            f"a preset named '{other}' exists; names that differ only in case are one file on Windows and macOS, "
            f"so save as '{other}' to replace it or choose another name",
            key="preset",
        )
    if path.exists() and not overwrite:
        raise ConfigError(f"a preset named '{name}' exists ({path}); choose another name or overwrite it", key="preset")
    write_config_file(path, sparse(config), description)
    log.info("saved preset %s to %s", name, path)
    return path


def delete_user_preset(name: str) -> None:
    """Delete the user preset of this name; also one whose name saving would now refuse (made by an
    older version, or on another system), so such a file can always be removed."""
    name = name.strip()
    if name.startswith(BUNDLED_PREFIX):
        raise ConfigError(f"'{name}' is a bundled preset, which cannot be deleted", key="preset")
    path = user_preset_dir() / f"{name}.json"
    if not name or set(name) & set("/\\") or name in (".", "..") or not _exists(path):
        raise ConfigError(f"no user preset named '{name}' (run 'presets list')", key="preset")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a preset; remove it yourself if it is not needed", key="preset")
    try:
        path.unlink()
    except OSError as e:  # a read-only folder, a file in use (Windows)
        raise ConfigError(f"could not delete {path}: {e.strerror or e}; check the folder's permissions", key="preset") from None
