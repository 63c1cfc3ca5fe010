"""Reading and writing config files (presets and --config files).

Reading never writes: a file that fails to load, or that needed migrating, stays exactly as it was.
Writing is atomic and stores only what differs from the defaults, with the format version.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from core.atomic import explained_write_errors, write_json_atomic
from core.errors import ConfigError, UserError

from .fields import PATH, PATH_MODEL, SectionList
from .migrations import CURRENT_VERSION, UNVERSIONED, VERSION_KEY, migrate
from .settings import get_value, iter_settings, validate_overlay

DESCRIPTION_KEY = "__description"
# A settings file is a few kilobytes; a file far larger is not one, and reading it whole would be slow.
MAX_FILE_BYTES = 16 * 2**20


def read_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """A validated sparse overlay from a JSON file, and its description ("" if none).

    Anything wrong with the file, however hostile its content, is a ConfigError naming it: a preset
    list must show one broken file beside the others, never fail because of it.
    """
    path = Path(path)
    source = str(path)
    data = _parse(_read_bytes(path, source), source)
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(type(data), "a number")
        raise ConfigError(f"must hold a JSON object of settings ({{...}}), not {kind}", source=source)
    version = data.pop(VERSION_KEY, UNVERSIONED)
    description = data.pop(DESCRIPTION_KEY, "")
    if not isinstance(description, str):
        raise ConfigError(f"'{DESCRIPTION_KEY}' must be a string", source=source, key=DESCRIPTION_KEY)
    data = migrate(data, version, source)
    overlay = validate_overlay(data, source)
    resolve_relative_paths(overlay, path.parent)
    return overlay, description


def _read_bytes(path: Path, source: str) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError("file not found; check the path", source=source) from None
    except OSError as e:
        raise ConfigError(f"cannot be read ({e.strerror or e}); check the path and its permissions", source=source) from None
    # Checked before reading: Windows reports a folder as "permission denied", and a FIFO would block.
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError("is a folder, not a JSON config file", source=source)
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError("is not a regular file (a device or pipe?), not a JSON config file", source=source)
    if info.st_size > MAX_FILE_BYTES:
        raise ConfigError(
            f"is {info.st_size / 2**20:.0f} MiB, far more than a settings file holds "
            f"(at most {MAX_FILE_BYTES // 2**20} MiB); choose the right file",
            source=source,
        )
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise ConfigError("is a folder, not a JSON config file", source=source) from None
    except OSError as e:
        raise ConfigError(f"cannot be read ({e.strerror or e}); check its permissions", source=source) from None


def _parse(raw: bytes, source: str) -> Any:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON", source=source) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix the file or choose another",
            source=source,
        ) from None
    except RecursionError:
        raise ConfigError("nests lists or objects too deeply to be settings; fix the file or choose another", source=source) from None
    except ValueError:
        # Python refuses integers of more than 4300 digits (sys.get_int_max_str_digits), as a plain ValueError.
        raise ConfigError("holds a number too long to read (thousands of digits); fix the file or choose another", source=source) from None
    try:
        # A lone \ud800 escape parses, but could never be written back or printed as UTF-8.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("holds text that is not valid Unicode (an unpaired surrogate escape such as \\ud800); fix the file", source=source) from None
    except RecursionError:
        raise ConfigError("nests lists or objects too deeply to be settings; fix the file or choose another", source=source) from None
    return data


def resolve_relative_paths(overlay: dict[str, Any], base_dir: Path) -> None:
    """Relative paths in a file are relative to the file's own folder, so presets can ship data.

    A model path that does not exist there and does not start with ./ or ../ is left alone: it is
    a Hugging Face hub id ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers").
    """
    for key, node in iter_settings():
        if isinstance(node, SectionList):
            items = _get(overlay, key) or []
            for item in items:
                for child in node.item.children:
                    if getattr(child, "kind", None) == PATH and item.get(child.name):
                        item[child.name] = _resolved(item[child.name], base_dir, child.path_kind)
            continue
        if node.kind != PATH:
            continue
        value = _get(overlay, key)
        if value:
            _put(overlay, key, _resolved(value, base_dir, node.path_kind))


def _resolved(value: str, base_dir: Path, path_kind: str | None) -> str:
    if os.path.isabs(value) or value.startswith("~"):
        return value
    candidate = (base_dir / value).resolve()
    explicit = value.startswith(("./", "../", ".\\", "..\\"))
    if path_kind == PATH_MODEL and not explicit and not candidate.exists():
        return value
    return str(candidate)


def _get(overlay: dict[str, Any], key: str) -> Any:
    try:
        return get_value(overlay, key)
    except (KeyError, TypeError):
        return None


def _put(overlay: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = overlay
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def write_config_file(path: str | os.PathLike, overlay: dict[str, Any], description: str = "") -> Path:
    """Write a sparse overlay atomically with the current format version first."""
    data: dict[str, Any] = {VERSION_KEY: CURRENT_VERSION}
    if description:
        data[DESCRIPTION_KEY] = description
    data.update(overlay)
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{target} is a folder, so the settings cannot be saved under that name; "
                        "rename or remove the folder, or choose another name")
    with explained_write_errors(target, "the settings file"):
        return write_json_atomic(target, data)
