"""Write and read textual-inversion embeddings (training_method EMBEDDING) as .safetensors.

Layout: one tensor per placeholder token, keyed by the token itself, shape (1, D), float32; the
same `{token: learned_embeds}` that diffusers' examples/textual_inversion script saves. The
safetensors metadata holds "placeholder_tokens" (JSON list: the order the tokens are added in),
and what the caller passes (initializer words, base model, step), JSON-encoded where not a string.

Loaders that accept the file (tests/test_embedding.py checks each):
- core.train.embedding.load_embedding(), into our sampler's tokenizer + text encoder (and for resuming);
- diffusers' TextualInversionLoaderMixin.load_textual_inversion, on a pipeline class that has
  the mixin and the family's tokenizer + encoder, e.g. `class P(<Family>Pipeline,
  TextualInversionLoaderMixin)` (a pipeline without the mixin has no `load_textual_inversion`).
  A one-token file loads by path: `pipe.load_textual_inversion("x.safetensors")`; the pipeline's
  own encode_prompt then gives the embeddings our sampler gives.
  A file with several tokens is refused by path (diffusers needs exactly one key per file);
  it loads as `pipe.load_textual_inversion([{k: v} for k, v in load_file(path).items()])`.
  Note that diffusers resizes the embedding matrix to len(tokenizer) + n, which for a vocabulary
  padded beyond the tokenizer's length drops the unused padding rows; outputs are unaffected.
Not tested: ComfyUI or other UIs' embedding loaders.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from core.atomic import write_bytes_atomic
from core.errors import UserError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TOKENS_METADATA = "placeholder_tokens"


class HasVectors(Protocol):
    """What save_embedding takes besides a plain mapping: core.train.embedding's PlaceholderEmbeddings."""

    def vectors(self) -> dict[str, torch.Tensor]: ...


def save_embedding(path: str | os.PathLike, embeddings: HasVectors | Mapping[str, torch.Tensor],
                   metadata: Mapping[str, Any] | None = None) -> Path:
    """Write {token: (1, D) float32} with metadata, atomically; returns the path."""
    from safetensors.torch import save

    vectors = embeddings.vectors() if hasattr(embeddings, "vectors") else dict(embeddings)
    if not vectors:
        raise ValueError("no embedding vectors to save")
    tensors = {token: v.detach().float().cpu().reshape(1, -1).contiguous() for token, v in vectors.items()}
    header = {"format": "pt", TOKENS_METADATA: json.dumps(list(vectors))}
    for key, value in (metadata or {}).items():
        if key not in header:
            header[str(key)] = value if isinstance(value, str) else json.dumps(value)
    target = write_bytes_atomic(path, save(tensors, metadata=header))
    logger.info("saved embedding %s (%s)", target, ", ".join(tensors))
    return target


def read_embedding(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({token: (D,) float32 vector} in the file's token order, metadata); a bad file is a UserError."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            names = handle.keys()  # a safe_open handle is not iterable itself
            tensors = {key: handle.get_tensor(key) for key in names}
    except Exception as error:  # OSError, or safetensors' own SafetensorError for a damaged header
        raise UserError(f"{path}: cannot read this embedding file ({error}); pick a .safetensors embedding") from error
    order = list(tensors)
    try:
        listed = json.loads(metadata.get(TOKENS_METADATA, "null"))
    except ValueError:
        listed = None
    if isinstance(listed, list) and sorted(listed) == sorted(order):
        order = listed  # safetensors stores keys sorted; the metadata keeps the tokens' own order
    vectors: dict[str, torch.Tensor] = {}
    for token in order:
        tensor = tensors[token]
        if tensor.ndim == 2 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 1 or not tensor.is_floating_point():
            raise UserError(f"{path}: {token!r} holds a {tuple(tensor.shape)} {tensor.dtype} tensor, not one embedding vector")
        vectors[token] = tensor.float()
    if not vectors:
        raise UserError(f"{path}: the file holds no embedding vectors")
    return vectors, metadata
