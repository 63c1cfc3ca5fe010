"""Optimizers and learning-rate schedules, from the libraries that have them."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from core.errors import UserError

log = logging.getLogger(__name__)

# Our schedule names -> diffusers.optimization's; warmup applies to each (CONSTANT warms up too).
_SCHEDULES = {
    "CONSTANT": "constant_with_warmup",
    "LINEAR": "linear",
    "COSINE": "cosine",
    "COSINE_WITH_RESTARTS": "cosine_with_restarts",
}
RESTART_CYCLES = 3  # cosine with restarts: the learning rate restarts this many times over the run


DEFAULT_SETTINGS = {"weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "momentum": 0.9}


def build_optimizer(name: str, param_groups: Iterable[dict[str, Any]], learning_rate: float,
                    settings: dict[str, Any] | None = None) -> Any:
    """The optimizer a setting names, over param groups that may carry their own learning rates.
    settings: the optimizer_settings section (weight_decay, beta1, beta2, eps, momentum); each
    optimizer takes those it has (the schema's defaults where one is missing)."""
    import torch

    groups = [g for g in param_groups if g["params"]]
    s = {**DEFAULT_SETTINGS, **(settings or {})}
    decay, betas, eps = float(s["weight_decay"]), (float(s["beta1"]), float(s["beta2"])), float(s["eps"])
    if name == "ADAMW":
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=decay)
    if name == "ADAMW_8BIT":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise UserError(f"optimizer ADAMW_8BIT needs bitsandbytes, which cannot be imported ({e}); choose ADAMW") from None
        return bnb.optim.AdamW8bit(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=decay)
    if name == "ADAFACTOR":
        from transformers.optimization import Adafactor

        # A fixed learning rate (not Adafactor's relative step) so schedules and warmup apply.
        return Adafactor(groups, lr=learning_rate, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=decay)
    if name == "PRODIGY":
        from prodigyopt import Prodigy

        # Prodigy estimates the step size itself; learning_rate scales it (1.0 is the usual value).
        return Prodigy(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=decay, safeguard_warmup=True)
    if name == "SGD":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=float(s["momentum"]), weight_decay=decay)
    raise UserError(f"unknown optimizer {name!r}")


def build_scheduler(name: str, optimizer: Any, warmup_steps: int, total_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        _SCHEDULES[name],
        optimizer=optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=max(total_steps, 1),
        num_cycles=RESTART_CYCLES if name == "COSINE_WITH_RESTARTS" else 1,
    )
