"""What a training method trains and saves: LORA, FINE_TUNE and EMBEDDING, one file each.

The trainer's loop is the same for all three; a method decides which parameters train (and at which
learning rates), what a batch needs before the forward pass (live text encoding when the text
encoder trains or placeholder tokens are learned), and what is saved at the end.
"""

from __future__ import annotations

from .base import TrainedParts


def parts_for(method: str) -> type[TrainedParts]:
    """The TrainedParts class of a training_method."""
    if method == "LORA":
        from .lora import LoraParts

        return LoraParts
    if method == "FINE_TUNE":
        from .finetune import FineTuneParts

        return FineTuneParts
    if method == "EMBEDDING":
        from .embedding import EmbeddingParts

        return EmbeddingParts
    raise ValueError(f"unknown training_method {method!r}")


__all__ = ["TrainedParts", "parts_for"]
