"""Small loading helpers every family adapter shares (reading configs, placing modules, quiet loads).

torch and transformers are imported inside the functions, so reading a config stays light.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def place(module: Any, device: torch.device | str, dtype: torch.dtype) -> None:
    """Move a module only when it is elsewhere: a no-op .to() still makes diffusers warn."""
    import torch

    param, want = next(module.parameters()), torch.device(device)
    same_device = param.device.type == want.type and want.index in (None, param.device.index)
    if not same_device or param.dtype != dtype:
        module.to(device=device, dtype=dtype)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers draws a "Loading weights" progress bar per model: noise in a log."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
