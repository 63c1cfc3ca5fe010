"""The settings arguments shared by every command that takes settings: --preset, --config, --set."""

from __future__ import annotations

import argparse
from typing import Any

from core.config import (
    load_preset_overlay,
    parse_set_arguments,
    read_config_file,
    resolve,
)


def add_settings_arguments(parser: argparse.ArgumentParser, *, positional_preset: bool = False) -> None:
    group = parser.add_argument_group("settings (the defaults, then the preset or config file, then each --set)")
    if positional_preset:
        parser.add_argument("preset", metavar="NAME|FILE", help="a preset name ('#wan 2.2 LoRA') or a JSON file")
    else:
        source = group.add_mutually_exclusive_group()
        source.add_argument("--preset", metavar="NAME|FILE", help="a preset name ('#wan 2.2 LoRA') or a preset file")
        source.add_argument("--config", metavar="FILE", help="a JSON config file (for example the output of 'presets show')")
    group.add_argument(
        "--set",
        dest="assignments",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one setting by its dotted key, e.g. --set lora.rank=32; the value is read as JSON "
        "where it parses (numbers, lists, true/false), else as text",
    )


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The complete, checked settings that the arguments describe."""
    overlays = []
    name = getattr(args, "preset", None)
    config_file = getattr(args, "config", None)
    if name:
        overlays.append(load_preset_overlay(name))
    elif config_file:
        overlays.append(read_config_file(config_file)[0])
    overlays.append(parse_set_arguments(args.assignments))
    return resolve(*overlays, source=name or config_file or "--set")
