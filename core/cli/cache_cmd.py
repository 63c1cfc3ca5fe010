"""'cache': compute the latent and text caches of a run's data without training."""

from __future__ import annotations

import argparse
import sys

from .settings_args import add_settings_arguments, settings_from_args


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "cache",
        help="precompute the latent and caption caches of a run",
        description="Compute the VAE latents of every clip (and cached variant) and the text embeddings of "
        "every caption into cache_dir, computing only what is missing. Training then reads them.",
    )
    add_settings_arguments(cmd)
    cmd.set_defaults(func=cache_command)


def cache_command(args: argparse.Namespace) -> int:
    config = settings_from_args(args)
    from pathlib import Path

    from core.train.output_guard import check_paths_set

    check_paths_set(config, ("cache_dir",))  # empty would fill the folder the app was started from

    from tqdm import tqdm

    from core.data.cache import ContentHasher
    from core.data.plan import plan_data
    from core.data.precompute import fill_caches
    from core.models.registry import adapter_for

    import torch

    cache_dir = Path(config["cache_dir"]).expanduser()
    adapter = adapter_for(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_data(config, adapter, ContentHasher(cache_dir), progress=lambda message: print(message, file=sys.stderr))
    bars: dict[str, tqdm] = {}

    def progress(what: str, done: int, total: int) -> None:
        bar = bars.get(what) or bars.setdefault(what, tqdm(total=total, desc=what, unit="entry", file=sys.stderr))
        bar.update(done - bar.n)

    report = fill_caches(
        plan, adapter, cache_dir, device=device, workers=max(1, config["dataloader_threads"]), progress=progress,
    )
    for bar in bars.values():
        bar.close()
    for issue in report.failed:
        print(f"left out: {issue}", file=sys.stderr)
    print(f"{len(plan.train)} training and {len(plan.validation)} validation samples in {cache_dir}")
    print(report.summary())
    return 0 if plan.train else 3
