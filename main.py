#!/usr/bin/env python3
"""Video Trainer. Without arguments the window opens; with a command it runs headless.

    python main.py                      open the window
    python main.py presets list         list presets
    python main.py --help               every command
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in ([], ["gui"]):
        # The window with nothing to parse: no parser is built (a few ms sooner to its first paint).
        from core.cli import run_guarded
        from gui.launch import open_window

        return run_guarded(open_window)
    from core.cli import build_parser, run
    from gui.launch import register_gui_command

    # Opening the window ('gui' or no command, without --help): the headless commands are not needed.
    window = (not argv or argv[0] == "gui") and not {"-h", "--help"} & set(argv)
    parser, commands = build_parser(headless=not window)
    register_gui_command(commands)
    return run(parser, argv or ["gui"])


if __name__ == "__main__":
    sys.exit(main())
