"""FINE_TUNE: every weight of the trained denoisers (and of each text encoder whose settings section,
text_encoder or text_encoder_2 ..., says train, at its own learning rate), saved as a diffusers model
folder the family's pipeline loads.

The pieces are in core/train/finetune.py (trainable groups, what cannot work), fused_backward.py
(the optimizer step inside backward) and core/export/diffusers_folder.py (the folder, atomically).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.models.base import Denoiser
from core.models.conditions import load_text_encoders, text_weight_dtypes, trained_text_encoders

from ..finetune import finetune_param_groups, make_trainable
from .base import TrainedParts, ema_path


class FineTuneParts(TrainedParts):
    saves_folder = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.text_encoders: dict[str, Any] = {}  # the trained ones, by name

    def load(self, denoisers: list[Denoiser], load_denoiser: Callable[[str], Any]) -> None:
        self.denoisers = denoisers
        self.transformers = [load_denoiser(d.name) for d in denoisers]
        for transformer in self.transformers:
            make_trainable(transformer)
        trained = trained_text_encoders(self.adapter, self.config)
        if trained:
            # All of them: encode_text runs every encoder; those not trained stay frozen.
            parts = load_text_encoders(self.adapter, self.device, text_weight_dtypes(self.adapter, self.config))
            for name in trained:
                self.text_encoders[name] = parts[name][1]
                make_trainable(self.text_encoders[name])

    def param_groups(self) -> list[dict[str, Any]]:
        return finetune_param_groups(self.config, self.transformers, self.text_encoders)

    def named_trainable(self) -> dict[str, Any]:
        named = {f"{d.name}/{name}": p for d, t in zip(self.denoisers, self.transformers)
                 for name, p in t.named_parameters() if p.requires_grad}
        for part, encoder in self.text_encoders.items():
            named.update({f"{part}/{name}": p for name, p in encoder.named_parameters() if p.requires_grad})
        return named

    @property
    def keeps_text_encoder(self) -> bool:
        return bool(self.text_encoders)

    def set_train_mode(self, training: bool) -> None:
        for encoder in self.text_encoders.values():
            encoder.train(training)

    def prepare_batch(self, batch: dict[str, Any], sample_captions: Callable[[list[Any]], list[str]]) -> dict[str, Any]:
        if not self.text_encoders:
            return batch
        # A text encoder trains: its outputs change every step, so every cached condition is replaced.
        encoded = self.adapter.encode_text(sample_captions(batch["sample_ids"]), grad=True)
        return {**batch, **{name: encoded[name] for name in self.adapter.condition_layout()}}

    def reduce_gradients(self, accelerator: Any) -> None:
        # DDP wraps the denoisers only; the text encoders' gradients are averaged here.
        if accelerator.num_processes == 1:
            return
        for encoder in self.text_encoders.values():
            for p in encoder.parameters():
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")

    def save(self, models: list[Any], steps: int, *, ema_suffix: str = "") -> list[Path]:
        import json

        from core.export.diffusers_folder import save_diffusers_folder

        trained: dict[str, Any] = {d.name: m for d, m in zip(self.denoisers, models)}
        trained.update(self.text_encoders)
        about = {"steps": steps, "base_model": str(self.config["base_model"]), "trained": sorted(trained),
                 "ema_decay": self.config["ema"]["decay"] if ema_suffix else None}
        output = ema_path(self.output_path(), ema_suffix)
        return [save_diffusers_folder(output, self.adapter.folder, trained,
                                      extra_files={"video_trainer.json": json.dumps(about, indent=2) + "\n"})]
