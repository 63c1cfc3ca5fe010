"""Text conditions as an open set of named tensors, and a family's text encoders by name.

A family's `encode_text` returns whatever its transformer consumes: one encoder's embeddings and
mask (Wan), several encoders' embeddings, pooled vectors with no padding axis, tensors whose padding
axis is not the first after the batch (such as (B, D, L)). The adapter's `condition_layout()` says,
per key, which axis of the per-sample tensor is padded (ConditionSpec.pad_axis; None for a fixed
size, such as a pooled (D,) vector) and with what value. The text cache stores each key trimmed of
its padding and the collate pads it back (core/data/cache.py, core/data/dataset.py); live encodings
(fine-tuning, textual inversion) merge into a cached batch key by key (core/train/embedding.py).

Text encoders: an adapter names its tokenizer/encoder pairs (`text_encoder_names`, such as
("text_encoder",) for Wan or ("text_encoder", "text_encoder_2") for a family with two). Each name is
also the settings section it is loaded and trained by (weight_dtype, train, learning_rate), so a
family with a second encoder needs one schema section of that name (core/config/schema.py,
`_model_part("text_encoder_2", ...)`) and nothing else here.

torch is imported lazily: planning a run reads names and dtypes only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ConditionSpec:
    """How one condition key is padded: `pad_axis` is an axis of the per-sample tensor (0 for an
    (L, D) embedding, 1 for a (D, L) one) padded to a common length with `pad_value`; None for a
    tensor of fixed size, stacked as it is."""

    pad_axis: int | None
    pad_value: float | bool = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"axis": self.pad_axis, "value": self.pad_value}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConditionSpec:
        axis = data.get("axis")
        return cls(None if axis is None else int(axis), data.get("value", 0.0))


# One encoder's (L, D) embeddings with the padding zeroed, and its (L,) bool mask: the layout of
# Wan (UMT5) and of any family whose text is one such pair. The mask is stored whole: it is small
# and its length is what the transformer gets.
TEXT_LAYOUT: dict[str, ConditionSpec] = {
    "prompt_embeds": ConditionSpec(0, 0.0),
    "prompt_mask": ConditionSpec(None, False),
}


def used_length(tensor: torch.Tensor, axis: int, value: float | bool) -> int:
    """How much of `tensor` along `axis` is not trailing padding (slices equal to `value` throughout).

    Trimming to this and padding back with `value` restores the tensor exactly, whatever it holds."""
    import torch

    moved = tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)
    differs = (moved != torch.tensor(value, dtype=tensor.dtype, device=tensor.device)).any(dim=1)
    found = torch.nonzero(differs)
    return int(found[-1]) + 1 if found.numel() else 0


def pad_axis_to(tensor: torch.Tensor, axis: int, length: int, value: float | bool) -> torch.Tensor:
    """`tensor` padded with `value` (or cut) to `length` along `axis`; out of place, so grads flow."""
    import torch

    have = tensor.shape[axis]
    if have == length:
        return tensor
    if have > length:
        return tensor.narrow(axis, 0, length)
    shape = list(tensor.shape)
    shape[axis] = length - have
    filler = torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, filler], dim=axis)


def text_weight_dtypes(adapter: Any, config: Mapping[str, Any]) -> dict[str, str]:
    """Each of the adapter's text encoders' weight_dtype, from the settings section of its name."""
    out = {}
    for name in adapter.text_encoder_names:
        if name not in config:
            raise ValueError(f"{adapter.family} has a text encoder {name!r} but the settings have no {name} section; "
                             f"add one to core/config/schema.py (as text_encoder's)")
        out[name] = str(config[name]["weight_dtype"])
    return out


def trained_text_encoders(adapter: Any, config: Mapping[str, Any]) -> list[str]:
    """The adapter's text encoders whose settings section says train."""
    return [name for name in adapter.text_encoder_names if name in config and config[name]["train"]]


def load_text_encoders(adapter: Any, device: Any, weight_dtypes: Mapping[str, str],
                       names: Sequence[str] | None = None) -> dict[str, tuple[Any, Any]]:
    """Load the named text encoders (all of the adapter's by default), each computing in its own
    weight_dtype's compute dtype and stored quantized where that says so; adapter.text_parts() after.
    An encoder missing from weight_dtypes loads in FLOAT_32."""
    from .dtypes import compute_dtype

    for name in adapter.text_encoder_names if names is None else names:
        weight_dtype = weight_dtypes.get(name, "FLOAT_32")
        adapter.load_text_encoder(device, compute_dtype(weight_dtype), weight_dtype, name=name)
    return adapter.text_parts()
