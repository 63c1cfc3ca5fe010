"""Small JPEG thumbnails of clips and images, made once and kept in a cache folder.

A thumbnail is keyed by the file's absolute path, size and modification time (and the thumbnail's
own size and this module's version), so a file changed on disk gets a new one and nothing needs
invalidating: stale entries are simply never asked for again. A clip's thumbnail is its first
frame, turned upright; an image's is the image. Written to a temporary name and renamed
(core.atomic), so two workers making the same one, or a crash, leave a whole file or none.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from core.atomic import write_bytes_atomic

from .discovery import media_kind
from .media import UnusableMedia
from .probe import clockwise_rotation, open_video, read_image

log = logging.getLogger(__name__)

THUMBNAIL_BOX = (144, 96)  # (width, height): a thumbnail fits in it, keeping the file's aspect ratio
THUMBNAIL_VERSION = 1  # part of every key: bump when what a thumbnail shows changes
JPEG_QUALITY = 85


def thumbnail_key(path: Path, box: tuple[int, int] = THUMBNAIL_BOX) -> str:
    """The cache key of a file's thumbnail as the file is now; OSError if it cannot be read."""
    st = os.stat(path)
    payload = f"{THUMBNAIL_VERSION}:{box[0]}x{box[1]}:{Path(path).absolute()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(payload.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def first_frame(path: Path) -> np.ndarray:
    """A clip's first frame (or an image) as uint8 RGB (H, W, 3), upright; UnusableMedia if it fails."""
    if media_kind(Path(path).name) != "video":
        return read_image(Path(path))
    import av

    container, stream = open_video(Path(path))
    try:
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            rgb = frame.to_ndarray(format="rgb24")
            rotation = clockwise_rotation(frame, stream)
            return np.rot90(rgb, k=-(rotation // 90)) if rotation else rgb
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise UnusableMedia(f"no frame can be decoded ({exc})") from None
    finally:
        container.close()
    raise UnusableMedia("has no frames")


def encode_thumbnail(rgb: np.ndarray, box: tuple[int, int] = THUMBNAIL_BOX) -> bytes:
    """rgb scaled to fit in box (width, height), never up, as JPEG bytes."""
    import cv2

    height, width = rgb.shape[:2]
    scale = min(1.0, box[0] / max(width, 1), box[1] / max(height, 1))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = cv2.resize(np.ascontiguousarray(rgb), size, interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise UnusableMedia("the thumbnail could not be encoded")
    return data.tobytes()


class ThumbnailCache:
    """Thumbnails under one folder, two levels deep by key (a folder of 1000 clips makes 1000 files)."""

    def __init__(self, folder: Path, box: tuple[int, int] = THUMBNAIL_BOX) -> None:
        self.folder = Path(folder)
        self.box = (int(box[0]), int(box[1]))

    def path_for(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.jpg"

    def cached(self, media: Path) -> Path | None:
        """The thumbnail file if it exists for the file as it is now (no decoding), else None."""
        try:
            found = self.path_for(thumbnail_key(media, self.box))
        except OSError:
            return None
        return found if found.is_file() else None

    def get(self, media: Path) -> Path:
        """The thumbnail file of media, made now if it is not cached; UnusableMedia if it cannot be."""
        try:
            key = thumbnail_key(media, self.box)
        except OSError as exc:
            raise UnusableMedia(f"cannot be read ({exc.strerror or exc})") from None
        target = self.path_for(key)
        if target.is_file():
            return target
        data = encode_thumbnail(first_frame(media), self.box)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, data)
        log.debug("thumbnail of %s made: %s", media, target)
        return target
