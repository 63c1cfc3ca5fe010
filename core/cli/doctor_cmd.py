"""'doctor': check a dataset the way training would use it, before any model is loaded.

Exit codes: 0 something can train; 2 a user error (bad preset, bad --set, no dataset given);
3 nothing usable is left; 4 strict_data refuses to start because some file is unusable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import UserError

from .settings_args import add_settings_arguments, settings_from_args


def register(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="check a dataset: captions, broken files, buckets, overfitting risk",
        description="Scan the datasets of a preset or config file, or one FOLDER, as training would: every "
        "unusable file and caption problem with its reason, clip lengths and sizes, the bucket plan, the "
        "validation split and how often each clip is seen. Exit code 0: ready; 3: nothing usable; "
        "4: strict_data refuses; 2: a settings problem.",
    )
    doctor.add_argument(
        "folder",
        nargs="?",
        metavar="FOLDER",
        help="a folder of clips and captions to check instead of the configured datasets",
    )
    add_settings_arguments(doctor)
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(func=doctor_command)


def doctor_command(args: argparse.Namespace) -> int:
    # Imported here so that building the parser stays light for every other command.
    from core.data.doctor import diagnose, diagnose_folder
    from core.data.doctor_text import render_report
    from core.models.shape import model_shape

    config = settings_from_args(args)
    if not args.folder and not config.get("datasets"):
        raise UserError("no dataset to check: give a FOLDER, or a --preset or --config that lists datasets")
    # The model's own frame counts and sizes when its folder is at hand (nothing is downloaded).
    shape = model_shape(config)
    if args.folder:
        report = diagnose_folder(Path(args.folder).expanduser(), config, shape=shape)
    else:
        report = diagnose(config, shape=shape)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(render_report(report), end="")
    return report.exit_code
