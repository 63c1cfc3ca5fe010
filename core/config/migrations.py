"""Numbered migrations of the config file format.

Every file the app writes carries "__version". A file with an older version is migrated in memory
step by step (MIGRATIONS[n] turns version n into n + 1); the file itself is left as it was, so a
failed or unwanted migration never costs the user their file. A file without "__version" is read as
version 1, the format of the product's seed examples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.errors import ConfigError

from .fields import shown_value

VERSION_KEY = "__version"
CURRENT_VERSION = 1
UNVERSIONED = 1

# MIGRATIONS[n]: takes a version-n dict (without the version key), returns the version n + 1 dict.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def migrate(data: dict[str, Any], version: Any, source: str | None = None) -> dict[str, Any]:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(
            f"'{VERSION_KEY}' must be a whole number from 1 to {CURRENT_VERSION}, not {shown_value(version)}",
            source=source,
            key=VERSION_KEY,
        )
    if version > CURRENT_VERSION:
        raise ConfigError(
            f"'{VERSION_KEY}' is {shown_value(version)}: written by a newer Video Trainer (this one reads format "
            f"versions up to {CURRENT_VERSION}); update Video Trainer to use this file",
            source=source,
            key=VERSION_KEY,
        )
    while version < CURRENT_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise ConfigError(f"no migration from format version {version}", source=source, key=VERSION_KEY)
        data = step(data)
        version += 1
    return data
