"""What Start would refuse, found without starting a run: the one list the window shows while the
settings are edited, and that disables its Start button (gui/start_check.py).

It is made of the same checks a run makes before any work (core/train/support.py's start_refusals,
the rules across settings, the paths that must be set), plus the dataset doctor's first question,
whether the dataset folders hold anything to train on, answered from the file names alone (no file
is probed; the doctor's full report adds what probing finds). Nothing here imports torch at import
time, nor downloads: a hub id that is not in the local cache is left for Start to download (when the
hub is switched off, that is a problem, said in one line).
"""

from __future__ import annotations

import logging
from typing import Any

from core.config.settings import consistency_problems
from core.data.discovery import DATASET_MISSING, discover_datasets
from core.errors import ConfigError
from core.model_folder import hub_download_needed
from core.models.registry import adapter_for

from .output_guard import check_paths_set
from .support import refusals, start_refusals

log = logging.getLogger(__name__)

NOTHING_TO_TRAIN = "Nothing to train on"


def start_problems(config: dict[str, Any], *, cuda: bool | None = None) -> list[ConfigError]:
    """Every reason a run with this complete config would not start, each naming its keys.

    cuda: whether a CUDA GPU is there, once torch has been imported; None before (the checks that
    need torch or the model family's classes are then left out: see start_refusals).
    """
    problems = list(consistency_problems(config))
    try:
        check_paths_set(config)
    except ConfigError as e:
        problems.append(e)
    problems += data_problems(config)
    adapter = None
    try:
        if not hub_download_needed(config["base_model"]):
            adapter = adapter_for(config, download=False)
    except ConfigError as e:
        problems.append(e)
    if adapter is not None:
        problems += start_refusals(config, adapter, cuda=cuda)
    else:  # the model is not known yet (to be downloaded, or wrong): what needs no model's family
        problems += refusals(config, cuda=None)
    return problems


def data_problems(config: dict[str, Any]) -> list[ConfigError]:
    """'Nothing to train on: why' when the dataset folders hold no captioned clip or image (from the
    folder listings only), else nothing."""
    items, issues = discover_datasets(config)
    if items:
        return []
    missing = [i for i in issues if i.reason.startswith(DATASET_MISSING)]
    if not config.get("datasets"):
        reason = "no dataset folders are configured; add a folder of clips on the Data tab"
    elif missing:
        reason = f"{missing[0].path}: {missing[0].reason}"
    elif issues:
        reason = f"no video or image has a usable caption ({issues[0].path.name}: {issues[0].reason})"
    else:
        reason = "no videos or images were found in the dataset folders; add clips, or choose another folder"
    return [ConfigError(f"{NOTHING_TO_TRAIN}: {reason}", key="datasets")]
