"""EMBEDDING (textual inversion): new placeholder tokens whose embedding rows are the only weights
that train, at embedding_learning_rate; the text encoder and the denoisers stay frozen (and may be
quantized). The pieces are in core/train/embedding.py and core/export/embedding.py.

The text encoder runs every step for the captions that hold a placeholder (their cached embeddings
were made without the new tokens and are replaced); captions without one keep their cached
embeddings, which the new rows cannot change, and a batch of only such captions trains nothing.
A run in which a placeholder is in no training caption is refused before caching
(core/train/data_prep.py, check_captions_hold_placeholders).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.models.base import Denoiser
from core.models.dtypes import compute_dtype

from ..embedding import (
    add_placeholder_tokens,
    encode_captions_live,
    merge_live_embeddings,
)
from .base import WRITTEN_BY, TrainedParts, ema_path


class EmbeddingParts(TrainedParts):
    placeholders: Any = None

    def load(self, denoisers: list[Denoiser], load_denoiser: Callable[[str], Any]) -> None:
        self.denoisers = denoisers
        self.transformers = [load_denoiser(d.name) for d in denoisers]  # frozen: gradients pass through
        part = self.config["text_encoder"]
        self.adapter.load_text_encoder(self.device, compute_dtype(part["weight_dtype"]), part["weight_dtype"])
        tokenizer, text_encoder = self.adapter.text_parts()
        embedding = self.config["embedding"]
        self.placeholders = add_placeholder_tokens(tokenizer, text_encoder, embedding["placeholder_tokens"],
                                                   embedding["initializer_words"], self.adapter.clean_caption)
        rows = self.placeholders.rows
        if rows.device != self.device:
            rows.data = rows.data.to(self.device)

    def trains_denoisers(self) -> bool:
        return False

    @property
    def keeps_text_encoder(self) -> bool:
        return True

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.placeholders.parameters()), "lr": self.config["embedding_learning_rate"]}]

    def named_trainable(self) -> dict[str, Any]:
        return {"embedding/rows": self.placeholders.rows}

    def prepare_batch(self, batch: dict[str, Any], sample_captions: Callable[[list[Any]], list[str]]) -> dict[str, Any]:
        live = encode_captions_live(self.adapter, sample_captions(batch["sample_ids"]), self.placeholders)
        if not live["indices"]:
            # No caption here holds a placeholder, so no loss depends on the rows, and backward would
            # fail ("does not require grad"). The step trains nothing: the rows get no gradient, and
            # the optimizer skips a parameter without one (no momentum, no weight decay).
            batch = dict(batch)
            batch["prompt_embeds"] = batch["prompt_embeds"].detach().requires_grad_(True)
            return batch
        return merge_live_embeddings(batch, live)

    def reduce_gradients(self, accelerator: Any) -> None:
        import torch

        rows = self.placeholders.rows  # not in a DDP-wrapped model: averaged here
        if accelerator.num_processes == 1:
            return
        # Every process takes part in the collective, also one whose captions held no placeholder;
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
        return [save_embedding(ema_path(self.output_path(), ema_suffix), self.placeholders, metadata)]
