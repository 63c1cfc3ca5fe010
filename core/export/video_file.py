"""Writing generated videos (training samples) as H.264 mp4 files, and reading them back.

The video is encoded in memory and then written with core.atomic.write_bytes_atomic (a temporary
name in the same folder, fsync, os.replace): a crash or an encoder error never leaves half an mp4
under the final name. Sample videos are small (a few MB at most), so holding one in memory is cheap.
"""

from __future__ import annotations

import io
import logging
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from core.atomic import write_bytes_atomic

logger = logging.getLogger(__name__)

# Visually near-lossless, still small; "medium" is x264's own default speed/size trade-off.
DEFAULT_CRF = 18


def _as_frames(frames: np.ndarray) -> np.ndarray:
    video = np.asarray(frames)
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
        raise ValueError(f"expected frames of shape (F, H, W, 3) with F >= 1, got {tuple(video.shape)}")
    if video.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {video.dtype}")
    # yuv420p halves the chroma resolution, so x264 needs even sizes: replicate the last row/column
    # (an edge colour, not black, so the extra line is invisible). Sizes from the samplers are even anyway.
    pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
    if pad_h or pad_w:
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(video)


def encode_mp4(frames: np.ndarray, fps: float, *, crf: int = DEFAULT_CRF) -> bytes:
    """(F, H, W, 3) uint8 RGB frames -> the bytes of an H.264 (libx264, yuv420p) mp4 at `fps`.

    Odd heights or widths are padded to even by repeating the last row or column."""
    import av

    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    video = _as_frames(frames)
    buffer = io.BytesIO()
    # bitexact keeps library version strings out of the file: the same frames give the same bytes.
    with av.open(buffer, "w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for image in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, *, crf: int = DEFAULT_CRF) -> Path:
    """Write frames ((F, H, W, 3) uint8 RGB) to `path` as an H.264 mp4, atomically; returns the path.

    Odd sizes are padded to even by edge replication (yuv420p needs even sizes)."""
    data = encode_mp4(frames, fps, crf=crf)
    target = write_bytes_atomic(path, data)
    logger.debug("wrote %s (%d frames, %.1f kB)", target, len(frames), len(data) / 1e3)
    return target


def read_video_frames(path: str | os.PathLike) -> np.ndarray:
    """Every frame of a video file as (F, H, W, 3) uint8 RGB, in order (for checks and previews)."""
    import av

    with av.open(str(path)) as container:
        images = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not images:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(images)
