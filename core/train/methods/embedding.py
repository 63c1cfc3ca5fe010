"""EMBEDDING (textual inversion): new placeholder tokens whose embedding rows are the only weights
that train, at embedding_learning_rate; the text encoder and the denoisers stay frozen (and may be
quantized). The pieces are in core/train/embedding.py and core/export/embedding.py.

The text encoder runs every step for the captions that hold a placeholder (their cached embeddings
were made without the new tokens and are replaced); captions without one keep their cached
embeddings, which the new rows cannot change.
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
from .base import TrainedParts, ema_path


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
                                                   embedding["initializer_words"])
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
        return merge_live_embeddings(batch, live)

    def reduce_gradients(self, accelerator: Any) -> None:
        rows = self.placeholders.rows  # not in a DDP-wrapped model: averaged here
        if accelerator.num_processes > 1 and rows.grad is not None:
            rows.grad = accelerator.reduce(rows.grad, reduction="mean")

    def save(self, models: list[Any], steps: int, *, ema_suffix: str = "") -> list[Path]:
        from core.export.embedding import save_embedding

        from ..output_guard import WRITTEN_BY

        embedding = self.config["embedding"]
        metadata = {**WRITTEN_BY, "initializer_words": embedding["initializer_words"],
                    "base_model": str(self.config["base_model"]), "step": steps}
        if ema_suffix:
            metadata["ema_decay"] = self.config["ema"]["decay"]
        return [save_embedding(ema_path(self.output_path(), ema_suffix), self.placeholders, metadata)]
