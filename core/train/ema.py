"""An exponential moving average of the trained weights (ema.enabled), with diffusers' EMAModel.

EMAModel keeps the shadow copies and the decay schedule: the decay starts low and rises to
ema.decay ((1 + n) / (10 + n), capped), so the average is not dominated by the first, untrained
weights. With ema.device CPU the shadow copies live in CPU memory and each update first copies the
trained weights there; that costs a device-to-host copy per optimizer step but no GPU memory, which
is what a run that barely fits needs. Samples are made with the averaged weights swapped in
(`applied()`), and the result is saved a second time from them, with an -ema suffix.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch


class TrainedAverage:
    def __init__(self, named_params: Mapping[str, torch.nn.Parameter], decay: float, device: str) -> None:
        from diffusers.training_utils import EMAModel

        self.names = list(named_params)
        self.params = list(named_params.values())
        on_gpu = device == "GPU" and any(p.device.type == "cuda" for p in self.params)
        self.device = self.params[0].device if on_gpu and self.params else torch.device("cpu")
        self._ema = EMAModel(self._sources(), decay=decay, foreach=False)

    def _sources(self) -> list[torch.Tensor]:
        if all(p.device == self.device for p in self.params):
            return self.params
        # EMAModel subtracts each weight from its shadow in place; the shadow lives on the CPU, so it
        # gets CPU copies. It only averages tensors that require grad (others it copies): say so.
        return [p.detach().to(self.device, dtype=torch.float32).requires_grad_(True) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in (after each optimizer step)."""
        self._ema.step(self._sources())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averaged weights by name (for backups and saving)."""
        return {name: shadow.detach() for name, shadow in zip(self.names, self._ema.shadow_params)}

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position (the shadow weights are stored by tensors())."""
        return {"optimization_step": int(self._ema.optimization_step), "decay": float(self._ema.decay)}

    def load(self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
        for name, shadow in zip(self.names, self._ema.shadow_params):
            shadow.copy_(tensors[name].to(shadow.device, shadow.dtype))
        self._ema.optimization_step = int(state["optimization_step"])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The trained parameters hold the averaged weights inside the block, their own after it."""
        # The trained weights wait in CPU memory: a fine-tuned model's second copy would not fit the GPU.
        saved = [p.detach().to("cpu", copy=True) for p in self.params]
        try:
            with torch.no_grad():
                for p, shadow in zip(self.params, self._ema.shadow_params):
                    p.copy_(shadow.to(p.device, p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, original in zip(self.params, saved):
                    p.copy_(original)
