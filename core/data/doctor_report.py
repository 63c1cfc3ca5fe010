"""The dataset doctor's report: plain data (dataclasses) the CLI renders (doctor_text) and the window
shows, and its JSON form. core/data/doctor.py fills it in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from .buckets import Bucket
from .media import Issue

EXIT_OK = 0
EXIT_UNUSABLE = 3  # nothing left to train on
EXIT_STRICT = 4  # strict_data is on and some file is unusable

@dataclass
class Stat:
    minimum: float
    median: float
    maximum: float


@dataclass
class SizeStat:
    """Frame sizes (width, height), ordered by area."""

    minimum: tuple[int, int]
    median: tuple[int, int]
    maximum: tuple[int, int]


@dataclass
class FilePlan:
    """One usable media file and what training makes of it."""

    path: Path
    kind: str
    dataset_index: int
    split: str  # "train" or "validation"
    width: int
    height: int
    fps: float
    duration: float
    frames_kept: int  # frames of one training sample (1 for images)
    bucket: Bucket


@dataclass
class BucketPlan:
    bucket: Bucket
    kind: str  # "video" or "image": they never share a batch
    items: int  # training files in this bucket
    samples_per_pass: int  # items counted with their dataset's repeats
    batch_size: int
    batches_per_pass: int


def item_unit(clips: int, images: int, stills_only: bool) -> str:
    """What to call a dataset's training items: "image" for an image model's (it takes stills only) or a
    folder of images only, "clip" for one of clips only, "item" for both or none."""
    if stills_only or (images and not clips):
        return "image"
    return "clip" if clips and not images else "item"


def unit_plural(unit: str) -> str:
    """ "images", "clips", or "clips or images" for items of both kinds."""
    return "clips or images" if unit == "item" else f"{unit}s"


def images_only(report: DatasetReport) -> bool:
    """Whether the report is about images alone: an image model's, or folders with no usable clip."""
    return bool(report.settings.get("stills_only")) or (report.clips == 0 and report.images > 0)


@dataclass
class DatasetSummary:
    index: int
    path: str
    repeats: int
    clips: int  # usable training clips
    images: int  # usable training images
    times_seen: float  # how often each item is drawn over the whole run
    rating: str  # conservative / moderate / high / risky ("" when it has nothing to train)
    hint: str
    unit: str = "item"  # what its items are, to say so: "image", "clip" or "item" (both, or none yet)


@dataclass
class DatasetReport:
    datasets: list[DatasetSummary]
    clips: int  # usable clips, training and validation
    images: int
    total_duration: float  # seconds of usable clips
    media_found: int  # media files found, usable or not
    durations: Stat | None
    fps: Stat | None
    sizes: SizeStat | None
    buckets: list[BucketPlan]
    files: list[FilePlan]
    issues: list[Issue]  # every problem, fatal or warning, sorted by path
    captions: dict[str, int]  # "missing", "empty", "not_utf8", "unreadable" -> count
    unusable_files: int  # media files that probing refused
    train_items: int
    validation_items: int
    batches_per_pass: int
    total_batches: int  # batches drawn over the run
    optimizer_steps: int
    strict_data: bool
    usable: bool
    why_unusable: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # the numbers the plan used

    @property
    def fatal_issues(self) -> list[Issue]:
        return [i for i in self.issues if i.fatal]

    @property
    def strict_refused(self) -> bool:
        return self.strict_data and bool(self.fatal_issues)

    @property
    def exit_code(self) -> int:
        """0: can train; 3: nothing usable; 4: strict_data refuses some unusable file."""
        if not self.usable:
            return EXIT_UNUSABLE
        if self.strict_refused:
            return EXIT_STRICT
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, buckets as [frames, height, width]."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        out.update(strict_refused=self.strict_refused, exit_code=self.exit_code)
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Issue):
        return {"path": str(value.path), "reason": value.reason, "fatal": value.fatal}
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
