"""'train': train headless with a progress bar; Ctrl+C stops cleanly between steps."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from .settings_args import add_settings_arguments, settings_from_args


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "train",
        help="train with a preset or config file",
        description="Train: cache what is missing, then run the training loop and save the result to "
        "output_path. Ctrl+C stops between steps, writes a backup and still saves; a second Ctrl+C stops "
        "at once. --resume continues from the newest backup.",
    )
    add_settings_arguments(cmd)
    cmd.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest backup in workspace_dir/backups (made with the same settings and data; "
        "max_steps or epochs may be raised to train a finished run further)",
    )
    cmd.add_argument(
        "--commands-dir",
        metavar="FOLDER",
        help="a folder in which another program asks the run to stop, sample or back up, by creating a file "
        "named stop, sample or backup there (the window does so for a run on several GPUs); the main process "
        "looks between steps",
    )
    cmd.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    config = settings_from_args(args)
    from tqdm import tqdm

    from core.train.events import FolderCommands, TrainerCallbacks, TrainerCommands
    from core.train.trainer import Trainer

    main_process = int(os.environ.get("RANK", "0")) == 0
    commands = FolderCommands(args.commands_dir, main=main_process) if args.commands_dir else TrainerCommands()

    class ProgressBar(TrainerCallbacks):
        def __init__(self) -> None:
            self.bar: Any = None

        def on_progress(self, step: int, total_steps: int, epoch: int, eta_seconds: float) -> None:
            if self.bar is None:
                self.bar = tqdm(total=total_steps, unit="step", file=sys.stderr, dynamic_ncols=True)
            self.bar.update(step - self.bar.n)

        def on_metrics(self, record: dict) -> None:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss_smoothed']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)

        def on_log(self, level: int, message: str) -> None:
            if level >= logging.WARNING:
                (self.bar.write if self.bar else lambda m: print(m, file=sys.stderr))(f"warning: {message}")
            else:
                logging.getLogger("core.train").info(message)
                if self.bar is None:
                    print(message, file=sys.stderr)

    def first_interrupt(signum: int, frame: Any) -> None:
        print("\nstopping after this step (Ctrl+C again to stop at once)...", file=sys.stderr)
        commands.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    callbacks = ProgressBar()
    previous = signal.signal(signal.SIGINT, first_interrupt)
    try:
        result = Trainer(config, callbacks, commands, resume=args.resume).run()
    finally:
        signal.signal(signal.SIGINT, previous)
        if callbacks.bar is not None:
            callbacks.bar.close()
    if not main_process:
        return 0  # several processes (accelerate launch): the main one speaks for the run
    state = "stopped early" if result.stopped_early else "finished"
    if result.resumed_from:
        state += f" (continued from step {result.resumed_from})"
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    skipped = f", {result.skipped_steps} step(s) skipped for a non-finite loss" if result.skipped_steps else ""
    print(f"{state}: {result.steps} of {result.total_steps} steps{loss}{skipped}")
    for path in result.output_paths:
        print(f"saved {path}")
    return 0
