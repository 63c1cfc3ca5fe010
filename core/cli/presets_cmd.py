"""'presets list | show | save | delete'."""

from __future__ import annotations

import argparse
import json

from core.config import list_presets, save_user_preset
from core.config.migrations import CURRENT_VERSION, VERSION_KEY
from core.config.presets import (
    check_user_preset_name,
    delete_user_preset,
    user_preset_path,
)
from core.errors import ConfigError
from core.paths import bundled_preset_dir, user_preset_dir

from .settings_args import add_settings_arguments, settings_from_args


def register(commands: argparse._SubParsersAction) -> None:
    presets = commands.add_parser("presets", help="list, show, save and delete presets", description="Work with presets.")
    sub = presets.add_subparsers(dest="presets_command", metavar="ACTION", required=True)

    listing = sub.add_parser("list", help="list bundled and user presets", description="List bundled and user presets.")
    listing.set_defaults(func=list_command)

    show = sub.add_parser(
        "show",
        help="print a preset's complete settings as JSON",
        description="Print the complete settings (defaults + preset + --set) as JSON, usable as a --config file.",
    )
    add_settings_arguments(show, positional_preset=True)
    show.set_defaults(func=show_command)

    save = sub.add_parser(
        "save",
        help="save settings as a user preset",
        description=f"Save settings (what differs from the defaults) as a user preset in {user_preset_dir()}.",
    )
    save.add_argument("name", help="the new preset's name (names starting with '#' are kept for bundled presets)")
    save.add_argument("--description", default="", help="one line describing the preset")
    save.add_argument("--overwrite", action="store_true", help="replace a user preset of the same name")
    add_settings_arguments(save)
    save.set_defaults(func=save_command)

    delete = sub.add_parser("delete", help="delete a user preset", description="Delete a user preset.")
    delete.add_argument("name")
    delete.set_defaults(func=delete_command)


def list_command(args: argparse.Namespace) -> int:
    infos = list_presets()
    for bundled, title, folder in ((True, "Bundled presets", bundled_preset_dir()), (False, "Your presets", user_preset_dir())):
        print(f"{title} ({folder}):")
        group = [p for p in infos if p.bundled == bundled]
        if not group:
            print("  (none)")
        for p in group:
            if p.error:
                print(f"  {one_line(p.name)}  [cannot be loaded: {one_line(p.error)}]")
            else:
                model = f"  [{p.model_type}]" if p.model_type else ""
                print(f"  {one_line(p.name)}{model}" + (f"  - {one_line(p.description)}" if p.description else ""))
    return 0


def one_line(text: str) -> str:
    """text as one printable line: a file's description or name may hold line breaks, control
    characters or (from undecodable file names) lone surrogates, which no terminal can print."""
    text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def show_command(args: argparse.Namespace) -> int:
    config = settings_from_args(args)
    print(json.dumps({VERSION_KEY: CURRENT_VERSION, **config}, indent=4, ensure_ascii=False))
    return 0


def save_command(args: argparse.Namespace) -> int:
    name = check_user_preset_name(args.name)
    if user_preset_path(name).exists() and not args.overwrite:
        raise ConfigError(f"a preset named '{name}' exists ({user_preset_path(name)}); add --overwrite to replace it or choose another name")
    config = settings_from_args(args)
    path = save_user_preset(name, config, args.description, overwrite=args.overwrite)
    print(f"saved preset '{name}' to {path}")
    return 0


def delete_command(args: argparse.Namespace) -> int:
    delete_user_preset(args.name)
    print(f"deleted preset '{args.name}'")
    return 0
