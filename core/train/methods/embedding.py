"""EMBEDDING (textual inversion): new placeholder tokens whose embedding rows are the only weights
that train, at embedding_learning_rate; the text encoder and the denoisers stay frozen (and may be
quantized). The pieces are in core/train/embedding.py and core/export/embedding.py.

The text encoder runs every step for the captions that hold a placeholder (their cached embeddings
were made without the new tokens and are replaced); captions without one keep their cached
embeddings, which the new rows cannot change, and a batch of only such captions trains nothing.
A run in which a placeholder is in no training caption is refused before caching
(core/train/data_prep.py, check_captions_hold_placeholders).

The tokens go into every text encoder the family lists in placeholder_encoders, each with its own
rows (initialised from that encoder's embeddings of the initializer words). The first encoder's
rows are saved at output_path, as a one-encoder file loaders take; each further encoder's go beside
it, named after the encoder (concept_text_encoder_2.safetensors).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.models.base import Denoiser, ModelAdapter
from core.models.conditions import load_text_encoders, text_weight_dtypes

from ..embedding import (
    add_placeholder_tokens,
    encode_captions_live,
    merge_live_embeddings,
)
from .base import WRITTEN_BY, TrainedParts, ema_path


class EmbeddingParts(TrainedParts):
    placeholders: Any = None  # the first placeholder encoder's (what captions are checked against)
    by_encoder: dict[str, Any]  # every placeholder encoder's, by encoder name

    def load(self, denoisers: list[Denoiser], load_denoiser: Callable[[str], Any]) -> None:
        self.denoisers = denoisers
        self.transformers = [load_denoiser(d.name) for d in denoisers]  # frozen: gradients pass through
        parts = load_text_encoders(self.adapter, self.device, text_weight_dtypes(self.adapter, self.config))
        embedding = self.config["embedding"]
        self.by_encoder = {}
        for name in self.adapter.placeholder_encoders:
            tokenizer, text_encoder = parts[name]
            placeholders = add_placeholder_tokens(tokenizer, text_encoder, embedding["placeholder_tokens"],
                                                  embedding["initializer_words"], self.adapter.clean_caption)
            rows = placeholders.rows
            if rows.device != self.device:
                rows.data = rows.data.to(self.device)
            self.by_encoder[name] = placeholders
        self.placeholders = next(iter(self.by_encoder.values()))

    def trains_denoisers(self) -> bool:
        return False

    @property
    def keeps_text_encoder(self) -> bool:
        return True

    def param_groups(self) -> list[dict[str, Any]]:
        params = [p for placeholders in self.by_encoder.values() for p in placeholders.parameters()]
        return [{"params": params, "lr": self.config["embedding_learning_rate"]}]

    def named_trainable(self) -> dict[str, Any]:
        # The first encoder's rows keep the name backups of one-encoder runs have always used.
        names = list(self.by_encoder)
        return {("embedding/rows" if i == 0 else f"embedding/{name}/rows"): self.by_encoder[name].rows
                for i, name in enumerate(names)}

    def prepare_batch(self, batch: dict[str, Any], sample_captions: Callable[[list[Any]], list[str]]) -> dict[str, Any]:
        live = encode_captions_live(self.adapter, sample_captions(batch["sample_ids"]), self.placeholders)
        if not live["indices"]:
            # No caption here holds a placeholder, so no loss depends on the rows, and backward would
            # fail ("does not require grad"). The step trains nothing: the rows get no gradient, and
            # the optimizer skips a parameter without one (no momentum, no weight decay).
            batch = dict(batch)
            layout = self.adapter.condition_layout()
            name = next(k for k in layout if batch[k].is_floating_point())  # e.g. prompt_embeds
            batch[name] = batch[name].detach().requires_grad_(True)
            return batch
        return merge_live_embeddings(batch, live, self.adapter.condition_layout())

    def reduce_gradients(self, accelerator: Any) -> None:
        if accelerator.num_processes == 1:
            return
        for placeholders in self.by_encoder.values():
            self._reduce_rows(placeholders.rows, accelerator)

    @staticmethod
    def _reduce_rows(rows: Any, accelerator: Any) -> None:
        import torch

        # The rows are in no DDP-wrapped model, so they are averaged here. Every process takes part in the collective, also one whose captions held no placeholder;
        # the step stays skipped (no gradient) only where none of them had one, as with one process.
        had = torch.tensor([0.0 if rows.grad is None else 1.0], device=rows.device)
        grad = rows.grad if rows.grad is not None else torch.zeros_like(rows)
        if float(accelerator.reduce(had, reduction="sum")) == 0:
            return
        rows.grad = accelerator.reduce(grad, reduction="mean")

    def save(self, models: list[Any], steps: int, *, ema_suffix: str = "") -> list[Path]:
        from core.export.embedding import save_embedding

        embedding = self.config["embedding"]
        metadata = {**WRITTEN_BY, "initializer_words": embedding["initializer_words"],
                    "base_model": str(self.config["base_model"]), "step": steps}
        if ema_suffix:
            metadata["ema_decay"] = self.config["ema"]["decay"]
        paths = self.result_paths(self.config, self.adapter, [d.name for d in self.denoisers], ema_suffix=ema_suffix)
        written = [save_embedding(paths[0], self.placeholders, metadata)]
        for path, (name, placeholders) in zip(paths[1:], list(self.by_encoder.items())[1:]):
            written.append(save_embedding(path, placeholders, {**metadata, "text_encoder": name}))
        return written

    @classmethod
    def result_paths(cls, config: dict[str, Any], adapter: ModelAdapter, denoiser_names: list[str], *,
                     ema_suffix: str = "") -> list[Path]:
        first = ema_path(Path(config["output_path"]).expanduser(), ema_suffix)
        return [first] + [first.with_name(f"{first.stem}_{name}{first.suffix}") for name in adapter.placeholder_encoders[1:]]
