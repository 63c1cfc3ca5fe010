"""The schema's dtype names as torch dtypes."""

from __future__ import annotations

from typing import Any

_FLOAT_DTYPES = {"FLOAT_32": "float32", "FLOAT_16": "float16", "BFLOAT_16": "bfloat16"}


def compute_dtype(name: str) -> Any:
    """The torch dtype computations run in for a weight_dtype or train_dtype setting.

    Quantized storage (FLOAT_8, INT_8, INT_4, NFLOAT_4) computes in bfloat16: the quantized weights
    are dequantized to it layer by layer.
    """
    import torch

    return getattr(torch, _FLOAT_DTYPES.get(name, "bfloat16"))
