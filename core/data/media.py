"""The shared vocabulary of the data pipeline: what a media file is, what is wrong with one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".webm", ".mkv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class UnusableMedia(Exception):
    """A file that cannot be trained on; str() is one line saying why (without the path)."""


@dataclass(frozen=True)
class MediaInfo:
    """What probing a file found, without decoding its frames.

    width and height are the display size: rotation metadata already applied.
    """

    path: Path
    kind: str  # "video" or "image"
    width: int
    height: int
    rotation: int  # degrees clockwise the stored frames are turned for display: 0, 90, 180 or 270
    fps: float  # average frames per second (1.0 for images)
    duration: float  # seconds (0.0 for images)
    frame_count: int  # frames in the file (1 for images)
    codec: str
    variable_frame_rate: bool
    size_bytes: int
    mtime_ns: int

    @property
    def is_video(self) -> bool:
        return self.kind == "video"


@dataclass(frozen=True)
class Issue:
    """One line about one file for the user: an unusable file, a missing caption, a skipped folder."""

    path: Path
    reason: str
    fatal: bool = True  # True: the file is left out of training; False: a warning only

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"
