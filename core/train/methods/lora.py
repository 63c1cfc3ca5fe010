"""LORA: peft LoRA layers on the denoisers' attention and feed-forward projections."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.models.base import Denoiser, ModelAdapter
from core.models.dtypes import compute_dtype

from .base import WRITTEN_BY, TrainedParts, ema_path


class LoraParts(TrainedParts):
    def load(self, denoisers: list[Denoiser], load_denoiser: Callable[[str], Any]) -> None:
        self.denoisers = denoisers
        self.transformers = [load_denoiser(d.name) for d in denoisers]
        for transformer in self.transformers:
            self._add_lora(transformer)  # after quantizing: peft wraps the quantized layers

    def _add_lora(self, transformer: Any) -> None:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        lora = self.config["lora"]
        targets = lora["target_layers"] or self.adapter.default_lora_targets()
        try:
            transformer.add_adapter(
                LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                           target_modules=targets, init_lora_weights=True, use_dora=bool(lora["decompose"]))
            )
        except ValueError as e:
            raise UserError(f"lora.target_layers {targets} match no layer of the model ({e}); leave it empty for the defaults") from None
        # LoRA weights train in float32 whatever the base's storage (fp32 master weights).
        cast_training_params(transformer, dtype=compute_dtype("FLOAT_32"))
        if self.config["output_format"] == "COMFY":
            self._check_comfy_names(transformer)

    def _check_comfy_names(self, transformer: Any) -> None:
        """Before any step: a LoRA on a layer the family's ComfyUI format cannot name would only fail
        at save; say so now, naming the settings."""
        from core.errors import ConfigError
        from core.export.lora import lora_scales, lora_state_dict

        comfy_keys = self.adapter.comfy_lora_keys()
        if comfy_keys is None:  # refused by name before loading (core/train/support.py)
            return
        try:
            comfy_keys(lora_state_dict(transformer), lora_scales(transformer))
        except ValueError as e:
            raise ConfigError(f"output_format COMFY: {e}; leave lora.target_layers empty for the defaults, name other "
                              "layers, or set output_format to DIFFUSERS", key="lora.target_layers") from None

    def param_groups(self) -> list[dict[str, Any]]:
        part_lr = self.config["transformer"]["learning_rate"]
        lr = self.config["learning_rate"] if part_lr is None else part_lr  # 0.0 means frozen, not "unset"
        # One group per expert: a step trains one expert, and the others, without gradients, are
        # left exactly as they are (see core/train/experts.py).
        return [{"params": [p for p in t.parameters() if p.requires_grad], "lr": lr} for t in self.transformers]

    def named_trainable(self) -> dict[str, Any]:
        return {f"{d.name}/{name}": p for d, t in zip(self.denoisers, self.transformers)
                for name, p in t.named_parameters() if p.requires_grad}

    @classmethod
    def _named_paths(cls, config: dict[str, Any], adapter: ModelAdapter, names: list[str], ema_suffix: str) -> dict[str, Path]:
        """Denoiser name -> its file: one LoRA file, or one per trained expert of a two-expert model
        (_high_noise, _low_noise)."""
        from core.export.lora import expert_output_paths

        output = ema_path(Path(config["output_path"]).expanduser(), ema_suffix)
        several = len(adapter.transformer_names()) > 1
        return expert_output_paths(output, names) if several else {names[0]: output}

    @classmethod
    def result_paths(cls, config: dict[str, Any], adapter: ModelAdapter, denoiser_names: list[str], *,
                     ema_suffix: str = "") -> list[Path]:
        return list(cls._named_paths(config, adapter, denoiser_names, ema_suffix).values())

    def save(self, models: list[Any], steps: int, *, ema_suffix: str = "") -> list[Path]:
        """One LoRA file, or one per trained expert of a two-expert model (_high_noise, _low_noise)."""
        from core.export.lora import save_lora

        config, lora = self.config, self.config["lora"]
        names = [d.name for d in self.denoisers]
        paths = self._named_paths(config, self.adapter, names, ema_suffix)
        saved = []
        for name, model in zip(names, models):
            metadata = {**WRITTEN_BY, "video_trainer.steps": str(steps), "video_trainer.base_model": str(config["base_model"])}
            if len(paths) > 1 or name != "transformer":
                metadata["video_trainer.component"] = name
            if ema_suffix:
                metadata["video_trainer.ema_decay"] = str(config["ema"]["decay"])
            saved.append(save_lora(paths[name], model, rank=lora["rank"], alpha=lora["alpha"],
                                   output_format=config["output_format"], metadata=metadata,
                                   comfy_keys=self.adapter.comfy_lora_keys()))
        return saved
