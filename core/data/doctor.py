"""The dataset doctor: discovery, probing, the bucket plan, the hold-out split and an overfitting
estimate, as plain data for the CLI (doctor_text.render_report) and the window. Never imports torch.

See docs/data-pipeline.md, "The dataset doctor".
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from core.models.shape import ModelShape

from .buckets import (
    Bucket,
    SampleRecord,
    assign_bucket,
    steps_per_epoch,
    total_batches,
    upscale_warning,
    video_batch_size,
)
from .discovery import (
    CAPTION_NOT_UTF8,
    CAPTION_UNREADABLE,
    DATASET_MISSING,
    EMPTY_CAPTION,
    NO_CAPTION,
    Item,
    discover_datasets,
)
from .doctor_report import (
    BucketPlan,
    DatasetReport,
    DatasetSummary,
    FilePlan,
    SizeStat,
    Stat,
    item_unit,
    unit_plural,
)
from .frames import NoAcceptedFrameCount, sample_length
from .holdout import discover_validation, split_holdout
from .media import Issue, MediaInfo, UnusableMedia
from .probe import probe

log = logging.getLogger(__name__)

PROBE_WORKERS = 4  # PyAV releases the GIL while demuxing and decoding, so a few threads overlap well

# Times each clip is seen over the run (docs/data-pipeline.md, "The dataset doctor"). The notes name
# <10 conservative, 10-50 moderate and >100 risky; 50-100 is called "high" here, and 100 itself risky.
CONSERVATIVE, MODERATE, HIGH, RISKY = "conservative", "moderate", "high", "risky"


def size_divisor(config: dict[str, Any]) -> int:
    """What bucket heights and widths are multiples of: the VAE's spatial compression times the
    transformer's patch size. Patch size 2 holds for every family known today; the model
    adapter knows the loaded model's exact value and takes over from this estimate."""
    return int(config["video_config"]["spatial_compression_ratio"]) * 2


def exposure_rating(times_seen: float) -> str:
    if times_seen < 10:
        return CONSERVATIVE
    if times_seen <= 50:
        return MODERATE
    if times_seen < 100:
        return HIGH
    return RISKY


def frames_kept(info: MediaInfo, config: dict[str, Any], rule: Any = None) -> int:
    """Frames of one training sample from this file (docs/data-pipeline.md, "Frame selection"):
    rounded to the model's frame rule when it is known (ModelShape.frame_rule), else to 4k + 1.
    0 when the file is shorter than the rule's shortest count (training leaves it out)."""
    if not info.is_video:
        return 1
    vc = config["video_config"]
    span = min(info.duration, float(vc["max_duration"]))
    # Candidates are the times k / target_fps with 0 <= t < span, counted as frames.py counts them
    # (so a 1.01 s clip at 16 fps has 17); the epsilon keeps 2.5 s x 16 fps at exactly 40.
    candidates = max(1, math.ceil(span * float(vc["target_fps"]) - 1e-6))
    window = min(candidates, int(vc["max_frames"]))
    try:
        return sample_length(int(config["frames"]), window, int(vc["temporal_compression_ratio"]), rule)
    except NoAcceptedFrameCount:
        return 0


def probe_all(paths: Sequence[Path], workers: int = PROBE_WORKERS) -> dict[Path, MediaInfo | UnusableMedia]:
    """Probe each file once, a few at a time; a failure is the UnusableMedia itself."""
    unique = list(dict.fromkeys(paths))

    def one(path: Path) -> MediaInfo | UnusableMedia:
        try:
            return probe(path)
        except UnusableMedia as e:
            return e
        except Exception as e:  # a probe bug must not hide the rest of the report
            log.exception("probing %s failed unexpectedly", path)
            return UnusableMedia(f"cannot be probed ({type(e).__name__}: {e})")

    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(unique), (os.cpu_count() or 2) * 2))) as pool:
        return dict(zip(unique, pool.map(one, unique)))


def diagnose_folder(folder: Path | str, config: dict[str, Any], progress: Callable[[int, int], None] | None = None,
                    shape: ModelShape | None = None) -> DatasetReport:
    """The report for one folder, with the other settings from config."""
    return diagnose({**config, "datasets": [{"path": str(folder), "repeats": 1}]}, progress, shape)


def diagnose(config: dict[str, Any], progress: Callable[[int, int], None] | None = None,
             shape: ModelShape | None = None) -> DatasetReport:
    """Check every configured dataset (and the validation folder) as training would use them.
    shape: what the model takes (core.models.shape.model_shape), when it is at hand; else frame
    counts and sizes are estimated from video_config."""
    items, issues = discover_datasets(config)
    if not config.get("datasets"):
        what = "images" if shape is not None and shape.frame_rule.stills_only else "clips"
        issues.append(Issue(Path("datasets"), f"no dataset folders are configured; add a folder of {what}"))
    validation, validation_issues = discover_validation(config)
    issues.extend(validation_issues)

    infos = _probe_with_progress([i.path for i in items + validation], progress)
    usable: list[tuple[Item, MediaInfo]] = []
    usable_validation: list[tuple[Item, MediaInfo]] = []
    reported: set[Path] = set()
    for source, target in ((items, usable), (validation, usable_validation)):
        for item in source:
            info = infos[item.path]
            if isinstance(info, UnusableMedia):
                if item.path not in reported:
                    issues.append(Issue(item.path, str(info)))
                    reported.add(item.path)
            else:
                target.append((item, info))
    unusable_count = len(reported)
    if shape is not None:  # what the model does not take, training leaves out too, by name
        usable = [pair for pair in usable if not _left_out(pair, config, shape, issues)]
        usable_validation = [pair for pair in usable_validation if not _left_out(pair, config, shape, issues)]

    info_of = {item: info for item, info in usable + usable_validation}
    train, held = split_holdout([i for i, _ in usable], config, validation=[i for i, _ in usable_validation])

    divisor = shape.size_divisor if shape is not None else size_divisor(config)
    rule = shape.frame_rule if shape is not None else None
    resolution = int(config["resolution"])
    plans: list[FilePlan] = []
    records: list[SampleRecord] = []
    for split, group in (("train", train), ("validation", held)):
        for item in group:
            info = info_of[item]
            frames = frames_kept(info, config, rule)
            if shape is not None and shape.fixed_size is not None:
                bucket = Bucket(frames, *shape.fixed_size)
            else:
                bucket = assign_bucket(info.width, info.height, frames, resolution, divisor)
            plans.append(FilePlan(item.path, info.kind, item.dataset_index, split, info.width, info.height, info.fps, info.duration, bucket.frames, bucket))
            upscaled = upscale_warning(info.width, info.height, bucket, info.kind)
            if upscaled:
                issues.append(Issue(item.path, upscaled, fatal=False))
            if split == "train":
                records.append(SampleRecord(len(records), bucket, item.repeats, info.is_video))

    batch_size = int(config["batch_size"])
    multiplier = float(config["video_config"]["video_batch_size_multiplier"])
    per_pass = steps_per_epoch(records, batch_size, multiplier) if records else 0
    batches = total_batches(config, records) if records else 0
    accumulation = int(config.get("gradient_accumulation_steps", 1))
    all_infos = [info for _, info in usable + usable_validation]
    videos = [i for i in all_infos if i.is_video]
    report = DatasetReport(
        datasets=_dataset_summaries(config, train, info_of, batches / per_pass if per_pass else 0.0,
                                    stills_only=shape is not None and shape.frame_rule.stills_only),
        clips=len(videos),
        images=len(all_infos) - len(videos),
        total_duration=sum(i.duration for i in videos),
        media_found=len(set(infos)) + sum(1 for i in issues if i.reason.startswith(NO_CAPTION)) + _caption_content_issues(issues),
        durations=_stat([i.duration for i in videos]),
        fps=_stat([i.fps for i in videos]),
        sizes=_size_stat([(i.width, i.height) for i in all_infos]),
        buckets=_bucket_plans(records, batch_size, multiplier),
        files=plans,
        issues=sorted(issues, key=lambda i: (str(i.path), i.reason)),
        captions=_caption_counts(issues),
        unusable_files=unusable_count,
        train_items=len(train),
        validation_items=len(held),
        batches_per_pass=per_pass,
        total_batches=batches,
        optimizer_steps=batches // accumulation,
        strict_data=bool(config.get("strict_data")),
        usable=bool(train),
        settings=_plan_settings(config, divisor, shape),
    )
    if not train:
        report.why_unusable = _why_unusable(report, items, usable)
    log.info("dataset doctor: %d training items, %d issues", len(train), len(report.issues))
    return report


def _left_out(pair: tuple[Item, MediaInfo], config: dict[str, Any], shape: ModelShape, issues: list[Issue]) -> bool:
    """Whether training leaves this file out for the model's frame rule (core/data/plan.py says the
    same in its issues); if so, the reason is appended to issues."""
    item, info = pair
    rule = shape.frame_rule
    if info.is_video and rule.stills_only:
        reason = f"a video clip, and {shape.name} is an image model that trains on still images; leave clips out of this dataset"
    elif not info.is_video and not rule.accepts(1):
        reason = f"a still image is one frame, which {shape.name} does not accept ({rule.describe()}); leave images out of this dataset"
    elif info.is_video and frames_kept(info, config, rule) == 0:
        reason = f"too short for {shape.name}: it takes {rule.describe()} frames; use a longer clip"
    else:
        return False
    issues.append(Issue(item.path, reason))
    return True


def _probe_with_progress(paths: list[Path], progress: Callable[[int, int], None] | None) -> dict[Path, MediaInfo | UnusableMedia]:
    if progress is None:
        return probe_all(paths)
    # In slices, so the window can move its progress bar while large folders are probed.
    out: dict[Path, MediaInfo | UnusableMedia] = {}
    unique = list(dict.fromkeys(paths))
    progress(0, len(unique))
    for start in range(0, len(unique), 16):
        out.update(probe_all(unique[start : start + 16]))
        progress(len(out), len(unique))
    return out


def _caption_content_issues(issues: list[Issue]) -> int:
    # Media whose caption is empty, not UTF-8 or unreadable: the issue names the caption file.
    return sum(1 for i in issues if i.reason.startswith((EMPTY_CAPTION, CAPTION_NOT_UTF8, CAPTION_UNREADABLE)))


def _caption_counts(issues: list[Issue]) -> dict[str, int]:
    prefixes = {"missing": NO_CAPTION, "empty": EMPTY_CAPTION, "not_utf8": CAPTION_NOT_UTF8, "unreadable": CAPTION_UNREADABLE}
    return {name: sum(1 for i in issues if i.reason.startswith(prefix)) for name, prefix in prefixes.items()}


def _stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    return Stat(min(values), float(statistics.median(values)), max(values))


def _size_stat(sizes: list[tuple[int, int]]) -> SizeStat | None:
    if not sizes:
        return None
    ordered = sorted(sizes, key=lambda wh: (wh[0] * wh[1], wh))
    return SizeStat(ordered[0], ordered[(len(ordered) - 1) // 2], ordered[-1])


def _bucket_plans(records: list[SampleRecord], batch_size: int, multiplier: float) -> list[BucketPlan]:
    video_bs = video_batch_size(batch_size, multiplier)
    groups: dict[tuple[Bucket, bool], list[SampleRecord]] = {}
    for record in records:
        groups.setdefault((record.bucket, record.is_video), []).append(record)
    out = []
    for (bucket, is_video), group in sorted(groups.items(), key=lambda kv: (not kv[0][1], kv[0][0])):
        size = video_bs if is_video else batch_size
        samples = sum(r.repeats for r in group)
        out.append(BucketPlan(bucket, "video" if is_video else "image", len(group), samples, size, math.ceil(samples / size)))
    return out


def _dataset_summaries(config: dict[str, Any], train: list[Item], info_of: dict[Item, MediaInfo], passes: float, *,
                       stills_only: bool = False) -> list[DatasetSummary]:
    by_epochs = config.get("stop_after") == "EPOCHS"
    out = []
    for index, dataset in enumerate(config.get("datasets") or []):
        mine = [i for i in train if i.dataset_index == index]
        clips = sum(1 for i in mine if info_of[i].is_video)
        repeats = int(dataset.get("repeats", 1))
        # Each pass draws every (item, repeat) once, so an item is seen passes x repeats times.
        times = passes * repeats if mine else 0.0
        rating = exposure_rating(times) if mine else ""
        unit = item_unit(clips, len(mine) - clips, stills_only)
        out.append(DatasetSummary(index, str(dataset.get("path", "")), repeats, clips, len(mine) - clips, times, rating,
                                  _hint(rating, by_epochs, unit), unit))
    return out


def _hint(rating: str, by_epochs: bool, unit: str = "item") -> str:
    if rating not in (HIGH, RISKY):
        return ""
    length = "epochs" if by_epochs else "max_steps"
    more = f"add {unit_plural(unit)}, or lower {length} or repeats"
    return f"likely to overfit: {more}" if rating == RISKY else more


def _plan_settings(config: dict[str, Any], divisor: int, shape: ModelShape | None = None) -> dict[str, Any]:
    vc, validation = config["video_config"], config.get("validation") or {}
    plain = ("resolution", "frames", "batch_size", "gradient_accumulation_steps", "stop_after", "max_steps", "epochs", "seed")
    return {
        **{name: config.get(name) for name in plain},
        "size_divisor": divisor,
        # What the plan's frame counts and sizes came from: the model folder's adapter, or video_config.
        "model": shape.name if shape is not None else None,
        "stills_only": bool(shape is not None and shape.frame_rule.stills_only),  # an image model
        "frame_counts": shape.frame_rule.describe() if shape is not None else None,
        "fixed_size": list(shape.fixed_size) if shape is not None and shape.fixed_size else None,
        **{name: vc[name] for name in ("max_frames", "target_fps", "max_duration")},
        "video_batch_size": video_batch_size(int(config["batch_size"]), float(vc["video_batch_size_multiplier"])),
        "holdout_fraction": validation.get("holdout_fraction", 0.0),
        "validation_folder": validation.get("folder", ""),
    }


def _why_unusable(report: DatasetReport, items: list[Item], usable: list[tuple[Item, MediaInfo]]) -> str:
    if not report.datasets:
        return "no dataset folders are configured"
    if report.media_found == 0:
        if any(i.reason.startswith(DATASET_MISSING) for i in report.issues):
            return "no dataset folder could be scanned"
        return "no videos or images were found in the dataset folders"
    if not items:
        return "no media file has a usable caption"
    if not usable:
        return "every captioned media file is unusable"
    return "every usable item is set aside for validation"
