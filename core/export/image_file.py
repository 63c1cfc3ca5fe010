"""Writing generated images (the samples of a model that makes stills) as PNG files.

The image is encoded in memory and written with core.atomic.write_bytes_atomic, as the sample videos
are (core/export/video_file.py): a crash never leaves half a PNG under the final name.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np

from core.atomic import write_bytes_atomic

logger = logging.getLogger(__name__)


def encode_png(frames: np.ndarray) -> bytes:
    """One frame ((1, H, W, 3) or (H, W, 3) uint8 RGB) -> the bytes of a lossless PNG."""
    from PIL import Image

    image = np.asarray(frames)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one frame of shape (1, H, W, 3) or (H, W, 3), got {tuple(np.asarray(frames).shape)}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str | os.PathLike, frames: np.ndarray) -> Path:
    """Write one frame to `path` as a PNG, atomically; returns the path."""
    data = encode_png(frames)
    target = write_bytes_atomic(path, data)
    logger.debug("wrote %s (%.1f kB)", target, len(data) / 1e3)
    return target
