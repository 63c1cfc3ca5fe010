"""The headless command line. main.py adds the 'gui' command and calls run().

Each command is a function taking the parsed arguments and returning an exit code. A UserError
becomes one line on stderr and exit code 2; anything else is logged with its traceback to the log
file and reported in one line with exit code 1. Nobody sees a traceback on the terminal.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

from core.errors import FollowedError, UserError
from core.log_setup import FILE_ONLY, log_file_path, setup_logging

log = logging.getLogger(__name__)
FOLLOWER_GRACE_SECONDS = 10.0

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors going through the same one-line path as everything else."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser(headless: bool = True) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser of main.py; headless=False leaves the headless commands out (main.py opening the
    window: their modules are not even imported, so the window appears sooner)."""
    parser = _Parser(
        prog="main.py",
        description="Video Trainer: train video diffusion models on your own clips. "
        "Without a command, the window opens.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    if not headless:
        return parser, commands
    from . import cache_cmd, doctor_cmd, estimate_cmd, presets_cmd, settings_cmd, tiny_model_cmd, train_cmd

    presets_cmd.register(commands)
    settings_cmd.register(commands)
    tiny_model_cmd.register(commands)
    doctor_cmd.register(commands)
    cache_cmd.register(commands)
    train_cmd.register(commands)
    estimate_cmd.register(commands)
    return parser, commands


def run(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Parse argv and run the chosen command behind the one error boundary."""

    def parsed_command() -> int:
        args = parser.parse_args(list(argv))
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USER_ERROR
        return int(args.func(args) or 0)

    return run_guarded(parsed_command)


def run_guarded(command: Callable[[], int]) -> int:
    """Run a command behind the one error boundary: a UserError is one line and exit code 2, a bug
    one line (its traceback in the log file) and exit code 1."""
    setup_logging()
    try:
        return int(command() or 0)
    except FollowedError as e:  # the main process of the run says it
        log.info("stopped with the main process: %s", e, extra=FILE_ONLY)
        # The launcher ends the whole job when the first process exits with an error: leave the main
        # process the time to print its line (after its own cleanup) rather than cut it off.
        time.sleep(FOLLOWER_GRACE_SECONDS)
        return EXIT_USER_ERROR
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # the boundary: a bug, reported in one line and logged in full
        log.exception("unexpected failure", extra=FILE_ONLY)
        print(f"error: unexpected failure ({type(e).__name__}: {e}); details in {log_file_path()}", file=sys.stderr)
        return EXIT_FAILURE
