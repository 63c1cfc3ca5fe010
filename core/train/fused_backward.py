"""Fused backward pass: each weight's optimizer step runs inside backward, as soon as its gradient is whole.

Full fine-tuning holds weights, optimizer state and gradients; the gradients alone are as large as the
weights. Here every trainable parameter gets its own optimizer (the same class and settings as the
unfused run, built by core.train.optim.build_optimizer) and a post-accumulate-grad hook that steps it and
frees its gradient, so at most a few gradients exist at any moment.

Learning rates: a "lead" optimizer that never touches a weight holds one param group per configured
group; the diffusers scheduler drives the lead exactly as it would drive a normal optimizer, and each hook
copies its group's current learning rate into the parameter's optimizer before stepping. Warmup and
schedules therefore apply exactly as in the unfused case. The trainer's step order per batch is:

    loss.backward()  (or accelerator.backward(loss))   # every weight steps in here
    fused.step()                                        # closes the step; the scheduler needs it first
    scheduler.step()

Per-parameter stepping is the same math as grouped stepping for optimizers whose update of a tensor
depends only on that tensor (AdamW, AdamW8bit, Adafactor, SGD); not for PRODIGY (its step size is
estimated over all weights) nor for a clipped total gradient norm, which the config checks refuse.
The hooks fire for float32 and bfloat16 weights alike, so autocast mixed precision works; accelerate's
prepared-optimizer wrapper is not used (it would step a second time), nor gradient accumulation, a
GradScaler (FLOAT_16) or DDP (its all-reduce hooks run after ours).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from core.train.optim import build_optimizer

log = logging.getLogger(__name__)


class _Lead(torch.optim.Optimizer):
    """Holds the param groups (and so the learning rates) that a scheduler steps; updates nothing."""

    def __init__(self, groups: list[dict[str, Any]], lr: float) -> None:
        super().__init__(groups, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        return None


class FusedBackward:
    """Per-parameter optimizers stepped by backward hooks, with one scheduler-facing lead optimizer.

    `factory(groups, lr)` builds the optimizer of one parameter from a single-group list; the default
    is build_optimizer(optimizer_name, ...). Use `FusedBackward.build(name, groups, lr)`.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], factory: Callable[[list[dict[str, Any]], float], Any], learning_rate: float) -> None:
        groups = [dict(g) for g in param_groups if list(g["params"])]
        for group in groups:
            group["params"] = list(group["params"])
            group.setdefault("lr", learning_rate)
        if not groups:
            raise ValueError("FusedBackward needs at least one trainable parameter")
        self.lead = _Lead(groups, learning_rate)
        # Parameters in a fixed order (group, then position), which state_dict() relies on.
        self._params: list[torch.nn.Parameter] = []
        self._optimizers: list[Any] = []
        self._group_of: list[int] = []
        self._index: dict[int, int] = {}
        seen: set[int] = set()
        for g, group in enumerate(self.lead.param_groups):
            options = {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
            for param in group["params"]:
                if id(param) in seen:
                    raise ValueError("a parameter appears in two param groups")
                seen.add(id(param))
                if not param.requires_grad:
                    raise ValueError("FusedBackward got a parameter that does not require grad; call make_trainable first")
                self._index[id(param)] = len(self._params)
                self._params.append(param)
                self._group_of.append(g)
                self._optimizers.append(factory([{**options, "params": [param]}], options["lr"]))
        self._last_step = [-1] * len(self._params)  # the lead step during which each parameter last stepped
        self._steps = 0  # closed steps (fused.step() calls)
        self._discard = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._params]
        log.info("fused backward: %d parameters in %d groups, one optimizer each", len(self._params), len(groups))

    @classmethod
    def build(cls, optimizer_name: str, param_groups: Iterable[dict[str, Any]], learning_rate: float,
              settings: dict[str, Any] | None = None) -> FusedBackward:
        return cls(param_groups, lambda groups, lr: build_optimizer(optimizer_name, groups, lr, settings), learning_rate)

    # -- the hook ----------------------------------------------------------------------------------
    def _hook(self, param: torch.Tensor) -> None:
        i = self._index[id(param)]
        if self._discard or param.grad is None:
            param.grad = None
            return
        if self._last_step[i] == self._steps:
            # A weight whose gradient completes twice in one step (used in two reentrant-checkpointed
            # segments, or backward called twice without fused.step()) would step twice: stop loudly.
            raise RuntimeError(
                "fused backward: a weight received its gradient twice in one step; call fused.step() after "
                "each backward, use non-reentrant gradient checkpointing and no gradient accumulation"
            )
        self._last_step[i] = self._steps
        optimizer = self._optimizers[i]
        lead_group = self.lead.param_groups[self._group_of[i]]
        for group in optimizer.param_groups:
            group["lr"] = lead_group["lr"]  # the scheduler's current learning rate for this group
        optimizer.step()
        param.grad = None  # the point of it all: the gradient is freed right here, inside backward

    # -- the optimizer-like surface the trainer uses -----------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The lead's groups: their "lr" is what the scheduler set (for logging the learning rate)."""
        return self.lead.param_groups

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """What build_scheduler() must be given."""
        return self.lead

    def step(self) -> None:
        """Close the step whose backward just ran (the weights already moved); then step the scheduler."""
        self.lead.step()
        self._steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to zero in normal use (the hooks free each gradient); clears any a discarded pass left."""
        for param in self._params:
            param.grad = None

    @contextlib.contextmanager
    def discarding(self) -> Iterator[None]:
        """A backward inside this block updates nothing and drops its gradients (e.g. a probe pass)."""
        self._discard = True
        try:
            yield
        finally:
            self._discard = False

    def remove(self) -> None:
        """Drop the hooks: after this, backward only accumulates gradients as usual."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- backups -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The lead's groups (learning rates) and each parameter's optimizer state, in a fixed order."""
        return {
            "version": 1,
            "steps": self._steps,
            "lead": self.lead.state_dict(),
            "parameters": [optimizer.state_dict() for optimizer in self._optimizers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict() of a FusedBackward built over the same parameters in the same order."""
        parts = state["parameters"]
        if len(parts) != len(self._optimizers):
            raise ValueError(f"fused backward state has {len(parts)} parameters, this model has {len(self._optimizers)}")
        self.lead.load_state_dict(state["lead"])
        for optimizer, part in zip(self._optimizers, parts):
            optimizer.load_state_dict(part)
        self._steps = int(state.get("steps", 0))
        self._last_step = [-1] * len(self._params)

    def __len__(self) -> int:
        return len(self._params)
