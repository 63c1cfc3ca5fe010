"""FINE_TUNE: every weight of the trained denoisers (and of the text encoder when text_encoder.train
is on, at its own learning rate), saved as a diffusers model folder the family's pipeline loads.

The pieces are in core/train/finetune.py (trainable groups, what cannot work), fused_backward.py
(the optimizer step inside backward) and core/export/diffusers_folder.py (the folder, atomically).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.models.base import Denoiser
from core.models.dtypes import compute_dtype

from ..finetune import finetune_param_groups, make_trainable
from .base import TrainedParts, ema_path


class FineTuneParts(TrainedParts):
    text_encoder: Any = None
    saves_folder = True

    def load(self, denoisers: list[Denoiser], load_denoiser: Callable[[str], Any]) -> None:
        self.denoisers = denoisers
        self.transformers = [load_denoiser(d.name) for d in denoisers]
        for transformer in self.transformers:
            make_trainable(transformer)
        if self.config["text_encoder"]["train"]:
            part = self.config["text_encoder"]
            self.text_encoder = self.adapter.load_text_encoder(self.device, compute_dtype(part["weight_dtype"]))
            make_trainable(self.text_encoder)

    def param_groups(self) -> list[dict[str, Any]]:
        return finetune_param_groups(self.config, self.transformers, self.text_encoder)

    def named_trainable(self) -> dict[str, Any]:
        named = {f"{d.name}/{name}": p for d, t in zip(self.denoisers, self.transformers)
                 for name, p in t.named_parameters() if p.requires_grad}
        if self.text_encoder is not None:
            named.update({f"text_encoder/{name}": p for name, p in self.text_encoder.named_parameters() if p.requires_grad})
        return named

    @property
    def keeps_text_encoder(self) -> bool:
        return self.text_encoder is not None

    def set_train_mode(self, training: bool) -> None:
        if self.text_encoder is not None:
            self.text_encoder.train(training)

    def prepare_batch(self, batch: dict[str, Any], sample_captions: Callable[[list[Any]], list[str]]) -> dict[str, Any]:
        if self.text_encoder is None:
            return batch
        # The text encoder trains: its outputs change every step, so the cached ones are replaced.
        encoded = self.adapter.encode_text(sample_captions(batch["sample_ids"]), grad=True)
        return {**batch, "prompt_embeds": encoded["prompt_embeds"], "prompt_mask": encoded["prompt_mask"]}

    def reduce_gradients(self, accelerator: Any) -> None:
        # DDP wraps the denoisers only; the text encoder's gradients are averaged here.
        if self.text_encoder is None or accelerator.num_processes == 1:
            return
        for p in self.text_encoder.parameters():
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")

    def save(self, models: list[Any], steps: int, *, ema_suffix: str = "") -> list[Path]:
        import json

        from core.export.diffusers_folder import save_diffusers_folder

        trained: dict[str, Any] = {d.name: m for d, m in zip(self.denoisers, models)}
        if self.text_encoder is not None:
            trained["text_encoder"] = self.text_encoder
        about = {"steps": steps, "base_model": str(self.config["base_model"]), "trained": sorted(trained),
                 "ema_decay": self.config["ema"]["decay"] if ema_suffix else None}
        output = ema_path(self.output_path(), ema_suffix)
        return [save_diffusers_folder(output, self.adapter.folder, trained,
                                      extra_files={"video_trainer.json": json.dumps(about, indent=2) + "\n"})]
