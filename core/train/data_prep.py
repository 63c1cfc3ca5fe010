"""The data plan of a run with every cache entry filled, the same in every process."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.data.cache import ContentHasher
from core.data.plan import plan_data
from core.data.precompute import fill_caches
from core.errors import UserError


def plan(config: dict[str, Any], adapter: Any, log: Callable[[int, str], None]) -> Any:
    cache_dir = Path(config["cache_dir"]).expanduser()
    return plan_data(config, adapter, ContentHasher(cache_dir), progress=lambda m: log(logging.INFO, m))


def prepare_data(config: dict[str, Any], adapter: Any, accelerator: Any, log: Callable[[int, str], None],
                 stop_requested: Callable[[], bool]) -> Any:
    """The data plan with every cache entry filled; None if a stop was requested meanwhile.

    Only the main process fills the caches; the others wait at a barrier, then plan (cheap: no
    decoding) and leave out the files the main process could not decode, so every process ends
    with the same plan and reads the same entries.
    """
    cache_dir = Path(config["cache_dir"]).expanduser()
    several = accelerator.num_processes > 1
    outcome: dict[str, Any] = {"failed": [], "stopped": False, "error": None}
    data, error = None, None
    if accelerator.is_main_process:
        try:
            data = plan(config, adapter, log)
            _check_captions(config, data)  # before caching, which may take long
            report = fill_caches(
                data, adapter, cache_dir, device=str(accelerator.device), workers=max(1, config["dataloader_threads"]),
                should_stop=stop_requested,
            )
            log(logging.INFO, report.summary())
            for issue in report.failed:
                log(logging.WARNING, f"left out: {issue}")
            outcome.update(failed=list(report.failed), stopped=stop_requested())
        except Exception as e:
            if not several:
                raise
            error = e  # tell the waiting processes before raising, so they do not wait forever
            outcome["error"] = str(e) or type(e).__name__
    if several:
        from accelerate.utils import broadcast_object_list

        accelerator.wait_for_everyone()
        box = [outcome]
        broadcast_object_list(box, from_process=0)
        outcome = box[0]
        if error is not None:
            raise error
        if outcome["error"] is not None:
            raise UserError(f"the main process failed while preparing the data: {outcome['error']}")
        if not accelerator.is_main_process:
            data = plan(config, adapter, log)
            data.drop({issue.path for issue in outcome["failed"]}, outcome["failed"])
    if outcome["stopped"]:
        return None
    if not data.train:
        raise UserError("no clips are left to train on after caching (see the warnings above)")
    _check_captions(config, data)  # again: files that failed at caching are left out
    return data


def _check_captions(config: dict[str, Any], data: Any) -> None:
    from .embedding import check_captions_hold_placeholders

    folders = dict.fromkeys(str(s.item.root) for s in data.train)
    check_captions_hold_placeholders(config, [s.item.caption for s in data.train], list(folders))
