"""'tiny-model': write a tiny, randomly initialised model folder of a real architecture."""

from __future__ import annotations

import argparse

from core.errors import UserError
from core.models.tiny import TINY_FAMILIES  # torch-free at import (tests/test_tiny_models.py), so --help stays light


def register(commands: argparse._SubParsersAction) -> None:
    tiny = commands.add_parser(
        "tiny-model",
        help="write a tiny random model of a real architecture (for tests and the demo)",
        description="Write a diffusers-format folder (model_index.json, transformer/, vae/, text_encoder/, "
        "tokenizer/, scheduler/) of a tiny, randomly initialised model built from the real classes, offline.",
    )
    tiny.add_argument("--family", required=True, choices=TINY_FAMILIES, help="the model family")
    tiny.add_argument("--out", required=True, metavar="DIR", help="the folder to create (must not exist or be empty)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    tiny.set_defaults(func=tiny_model_command)


def tiny_model_command(args: argparse.Namespace) -> int:
    from core.models.tiny import build_tiny_model

    try:
        out = build_tiny_model(args.family, args.out, seed=args.seed)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    print(f"wrote tiny {args.family} model to {out}")
    return 0
