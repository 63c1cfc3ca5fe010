"""The 'gui' command. Imports nothing from Qt until the window is really wanted, so that headless
commands (and their --help) start fast and work without a display."""

from __future__ import annotations

import argparse

TAB_NAMES = ("general", "model", "data", "video", "training", "lora", "embedding", "sampling", "backup")


def register_gui_command(commands: argparse._SubParsersAction) -> None:
    gui = commands.add_parser(
        "gui",
        help="open the window (the default without a command)",
        description="Open the Video Trainer window.",
    )
    gui.add_argument("--preset", metavar="NAME|FILE", help="load this preset into the window")
    gui.add_argument("--tab", choices=TAB_NAMES, help="show this tab first")
    gui.add_argument("--screenshot", metavar="FILE.png", help="render the window to a PNG and exit")
    gui.set_defaults(func=gui_command)


def gui_command(args: argparse.Namespace) -> int:
    from gui.app import run_app

    return run_app(preset=args.preset, tab=args.tab, screenshot=args.screenshot)


def open_window() -> int:
    """'main.py gui' without options (main.py calls it without building the parser)."""
    from gui.app import run_app

    return run_app()
