"""Reading and writing config files (presets and --config files).

Reading never writes: a file that fails to load, or that needed migrating, stays exactly as it was.
Writing is atomic and stores only what differs from the defaults, with the format version.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from core.atomic import write_json_atomic
from core.errors import ConfigError

from .fields import PATH, PATH_MODEL, SectionList
from .migrations import CURRENT_VERSION, UNVERSIONED, VERSION_KEY, migrate
from .settings import get_value, iter_settings, validate_overlay

DESCRIPTION_KEY = "__description"


def read_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """A validated sparse overlay from a JSON file, and its description ("" if none)."""
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("file not found; check the path", source=source) from None
    except IsADirectoryError:
        raise ConfigError("is a folder, not a JSON config file", source=source) from None
    except OSError as e:
        raise ConfigError(f"cannot be read ({e.strerror}); check its permissions", source=source) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text; save it as UTF-8 JSON", source=source) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix the file or choose another",
            source=source,
        ) from None
    if not isinstance(data, dict):
        raise ConfigError("must hold a JSON object of settings ({...})", source=source)
    version = data.pop(VERSION_KEY, UNVERSIONED)
    description = data.pop(DESCRIPTION_KEY, "")
    if not isinstance(description, str):
        raise ConfigError(f"'{DESCRIPTION_KEY}' must be a string", source=source, key=DESCRIPTION_KEY)
    data = migrate(data, version, source)
    overlay = validate_overlay(data, source)
    resolve_relative_paths(overlay, path.parent)
    return overlay, description


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
    return write_json_atomic(path, data)
