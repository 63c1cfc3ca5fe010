"""Operations on settings, all derived from the schema: defaults, validation, merging, diffs.

A config is a plain JSON-shaped dict nested like the schema. Presets and config files hold sparse
overlays (only what differs from the defaults); a resolved config holds every setting.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

from core.errors import ConfigError

from .fields import Section, SectionList, Setting, SettingValueError
from .schema import SCHEMA

Node = Setting | Section | SectionList


def iter_settings(section: Section = SCHEMA, prefix: str = "") -> Iterator[tuple[str, Setting | SectionList]]:
    """Every leaf setting (and list of sections) with its dotted key, in declaration order."""
    for child in section.children:
        key = f"{prefix}{child.name}"
        if isinstance(child, Section):
            yield from iter_settings(child, key + ".")
        else:
            yield key, child


def lookup(key: str, source: str | None = None) -> Node:
    """The declaration of a dotted key; unknown keys get a message with the closest known names."""
    node: Node = SCHEMA
    parts = key.split(".")
    for i, part in enumerate(parts):
        child = node.child(part) if isinstance(node, Section) else None
        if child is None:
            parent = ".".join(parts[:i])
            raise _unknown_key(key, node if isinstance(node, Section) else None, parent, source)
        node = child
    return node


def _unknown_key(key: str, section: Section | None, parent: str, source: str | None) -> ConfigError:
    names = [c.name for c in section.children] if section else []
    prefix = f"{parent}." if parent else ""
    import difflib  # only for a wrong key's suggestions

    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(prefix + c for c in close)}? " if close else ""
    where = f"in {parent} " if parent else ""
    return ConfigError(
        f"unknown setting '{key}'; {hint}the settings {where}are: {', '.join(prefix + n for n in names)}",
        source=source,
        key=key,
    )


def section_defaults(section: Section) -> dict[str, Any]:
    """The defaults of a section, as a new dict (callers may change it)."""
    return copy.deepcopy(_section_defaults(section))


# id(section) -> (section, defaults). The schema never changes while the app runs, and the training
# loop asks for these every step. (Sections hold dicts, so they cannot be keys themselves.)
_DEFAULTS: dict[int, tuple[Section, dict[str, Any]]] = {}


def _section_defaults(section: Section) -> dict[str, Any]:
    known = _DEFAULTS.get(id(section))
    if known is not None and known[0] is section:
        return known[1]
    out: dict[str, Any] = {}
    for child in section.children:
        if isinstance(child, Section):
            out[child.name] = _section_defaults(child)
        elif isinstance(child, SectionList):
            out[child.name] = [fill_item(child, item) for item in child.default]
        else:
            out[child.name] = list(child.default) if isinstance(child.default, tuple) else child.default
    _DEFAULTS[id(section)] = (section, out)
    return out


def defaults() -> dict[str, Any]:
    """A complete config with every setting at its default."""
    return section_defaults(SCHEMA)


def fill_item(node: SectionList, item: dict[str, Any]) -> dict[str, Any]:
    """A list item with its missing fields at their defaults."""
    return merge(section_defaults(node.item), item)


def validate_overlay(data: Any, source: str | None = None, *, section: Section = SCHEMA, prefix: str = "") -> dict[str, Any]:
    """Check a (sparse) overlay against the schema; return a normalised copy or raise ConfigError."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"'{where}' must be a JSON object of settings, not {_json(data)}", source=source, key=prefix.rstrip(".") or None)
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        child = section.child(name)
        if child is None:
            raise _unknown_key(key, section, prefix.rstrip("."), source)
        if isinstance(child, Section):
            out[name] = validate_overlay(value, source, section=child, prefix=key + ".")
        elif isinstance(child, SectionList):
            out[name] = _validate_list(child, value, key, source)
        else:
            try:
                out[name] = child.check(value)
            except SettingValueError as e:
                raise ConfigError(f"'{key}' {e}", source=source, key=key) from None
    return out


def _validate_list(node: SectionList, value: Any, key: str, source: str | None) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ConfigError(f"'{key}' must be a list of objects with {_item_fields(node)}, not {_json(value)}", source=source, key=key)
    items = []
    for i, item in enumerate(value):
        checked = validate_overlay(item, source, section=node.item, prefix=f"{key}[{i}].")
        items.append(fill_item(node, checked))
    if len(items) < node.min_items:
        raise ConfigError(f"'{key}' needs at least {node.min_items} entries", source=source, key=key)
    return items


def _item_fields(node: SectionList) -> str:
    return ", ".join(f"'{c.name}'" for c in node.item.children)


def _json(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) < 60 else text[:57] + "..."


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge overlay onto a copy of base: objects merge key by key; lists and values replace."""
    out = copy.deepcopy(base)
    for name, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = merge(out[name], value)
        else:
            out[name] = copy.deepcopy(value)
    return out


def resolve(*overlays: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """Defaults with each overlay merged on in turn, checked for consistency across settings."""
    config = defaults()
    for overlay in overlays:
        config = merge(config, overlay)
    check_consistency(config, source)
    return config


def consistency_problems(config: dict[str, Any], source: str | None = None) -> list[ConfigError]:
    """Every broken rule that involves more than one setting (empty when the config is consistent)."""
    problems = []
    frames, window = config["frames"], config["video_config"]["max_frames"]
    if frames > window:
        problems.append(
            ConfigError(
                f"'frames' ({frames}) is larger than 'video_config.max_frames' ({window}), the window frames "
                "are picked from; raise video_config.max_frames or lower frames",
                source=source,
                key="frames",
                also=("video_config.max_frames",),
            )
        )
    objective = config["objective"]
    if objective["min_timestep"] >= objective["max_timestep"]:
        problems.append(
            ConfigError(
                f"'objective.min_timestep' ({objective['min_timestep']}) must be below 'objective.max_timestep' "
                f"({objective['max_timestep']})",
                source=source,
                key="objective.min_timestep",
                also=("objective.max_timestep",),
            )
        )
    return problems


def check_consistency(config: dict[str, Any], source: str | None = None) -> None:
    """Raise the first broken rule across settings, if any."""
    problems = consistency_problems(config, source)
    if problems:
        raise problems[0]


def sparse(config: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Only what differs from base (the defaults unless given): what a preset file stores."""
    base = defaults() if base is None else base
    out: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, dict) and isinstance(base.get(name), dict):
            nested = sparse(value, base[name])
            if nested:
                out[name] = nested
        elif base.get(name, object()) != value:
            out[name] = copy.deepcopy(value)
    return out


def get_value(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node


def set_value(config: dict[str, Any], key: str, value: Any, source: str | None = None) -> None:
    """Set a dotted key after checking the value against its declaration."""
    overlay = overlay_for(key, value, source)
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = get_value(overlay, key)


def overlay_for(key: str, value: Any, source: str | None = None) -> dict[str, Any]:
    """A validated one-setting overlay {a: {b: value}} for the dotted key."""
    lookup(key, source)
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return validate_overlay(nested, source)


def parse_set_arguments(assignments: list[str]) -> dict[str, Any]:
    """Turn --set dotted.key=value arguments into one validated overlay.

    The value is read as JSON where it parses (numbers, true/false, null, lists, objects), else as
    a plain string, so `--set lora.rank=32` and `--set base_model=/models/wan` both work.
    """
    overlay: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects dotted.key=value, got '{assignment}'")
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: '[[[[...' nested past what JSON decoding allows
            value = raw
        overlay = merge(overlay, overlay_for(key, value, source="--set"))
    return overlay


def applies(node: Setting | Section | SectionList, config: dict[str, Any]) -> bool:
    """Whether this one declaration's own condition holds (see applies_key for a whole dotted key)."""
    return all(get_value(config, key) in allowed for key, allowed in node.applies_when.items())


def applies_key(key: str, config: dict[str, Any]) -> bool:
    """Whether a dotted key means anything under config, counting the sections that hold it."""
    parts = key.split(".")
    return all(applies(lookup(".".join(parts[: i + 1])), config) for i in range(len(parts)))
