"""'settings': every setting with its dotted key, type, default, allowed values and help."""

from __future__ import annotations

import argparse
import json

from core.config import iter_settings
from core.config.fields import SectionList, Setting


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "settings",
        help="list every setting and its dotted key for --set",
        description="List every setting: its dotted key (for --set), default, allowed values and help.",
    )
    cmd.add_argument("--markdown", action="store_true", help="print a Markdown table (docs/settings.md is made this way)")
    cmd.set_defaults(func=settings_command)


def _default_text(node: Setting | SectionList) -> str:
    default = list(node.default) if isinstance(node.default, tuple) else node.default
    return json.dumps(default, ensure_ascii=False)


def _allowed_text(node: Setting | SectionList) -> str:
    if isinstance(node, SectionList):
        return "a list of objects with " + ", ".join(f"{c.name} ({c.allowed()})" for c in node.item.children)
    return node.allowed()


def _condition_text(node: Setting | SectionList) -> str:
    return "; ".join(f"only when {key} is {' or '.join(map(str, values))}" for key, values in node.applies_when.items())


def markdown() -> str:
    lines = [
        "# Settings",
        "",
        "Every setting of Video Trainer, generated from the schema in core/config/schema.py by",
        "`python main.py settings --markdown > docs/settings.md` (a test checks that this file is current).",
        "Set any of them with `--set KEY=VALUE` on the command line, in a preset, or in a `--config` file.",
        "",
        "| key | default | allowed | what it does |",
        "| --- | --- | --- | --- |",
    ]
    for key, node in iter_settings():
        help_text = node.help + (f" ({_condition_text(node)})" if node.applies_when else "")
        cells = [f"`{key}`", f"`{_default_text(node)}`", _allowed_text(node), help_text]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def settings_command(args: argparse.Namespace) -> int:
    if args.markdown:
        print(markdown(), end="")
        return 0
    for key, node in iter_settings():
        print(f"{key} = {_default_text(node)}")
        print(f"    {_allowed_text(node)}. {node.help}" + (f" ({_condition_text(node)})" if node.applies_when else ""))
    return 0
