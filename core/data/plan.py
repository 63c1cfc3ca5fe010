"""The data plan of a run: every usable sample with its bucket, its frames per cached variant and
the cache keys of its latents and caption. Planning probes files and hashes their content, but
decodes nothing and loads no model weights, so it is cheap enough to run before every training run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError, UserError
from core.memory.quantize import is_quantized_dtype
from core.models.base import ModelAdapter
from core.models.conditions import text_weight_dtypes
from core.models.dtypes import compute_dtype

from .augment import variant_count
from .buckets import Bucket, SampleRecord, assign_bucket, upscale_warning
from .cache import ContentHasher, latent_key, text_key
from .dataset import CachedSample
from .discovery import Item, discover_datasets
from .doctor import probe_all
from .frames import FramePlan, NoAcceptedFrameCount, plan_frames
from .holdout import discover_validation, split_holdout
from .media import Issue, MediaInfo, UnusableMedia
from .probe import keyframe_times, scene_cut_times

log = logging.getLogger(__name__)

# Part of every latent key: bump when decoding, resizing or frame placement changes what is cached.
PIPELINE_VERSION = 1


@dataclass(frozen=True)
class PlannedSample:
    item: Item
    info: MediaInfo
    content_hash: str
    bucket: Bucket
    plans: tuple[FramePlan, ...]  # one per cached variant
    latent_keys: tuple[str, ...]  # one per variant, in the same order
    text_key: str
    # One per variant where the text conditions depend on the clip's first frame (adapter.text_takes_image).
    text_keys: tuple[str, ...] = ()

    @property
    def cached(self) -> CachedSample:
        return CachedSample(self.latent_keys, self.text_key, self.item.caption_dropout, self.item.loss_weight,
                            self.text_keys)


@dataclass
class DataPlan:
    train: list[PlannedSample]
    validation: list[PlannedSample]
    issues: list[Issue] = field(default_factory=list)
    # The dtype the VAE computes in while caching (part of the latent keys), and each text
    # encoder's weight_dtype by name (its compute dtype and quantized storage; part of the text keys).
    vae_dtype: Any = None
    text_weight_dtypes: dict[str, str] = field(default_factory=dict)
    # The empty caption's text key, where a dataset drops captions (caption_dropout > 0); else None.
    empty_text_key: str | None = None

    def sampler_records(self) -> list[SampleRecord]:
        """For BucketBatchSampler: the sample id is the index into `train`."""
        return [SampleRecord(i, s.bucket, s.item.repeats, s.info.is_video) for i, s in enumerate(self.train)]

    def cached_samples(self) -> list[CachedSample]:
        return [s.cached for s in self.train]

    def drop(self, failed: set[Path], issues: list[Issue]) -> None:
        """Leave out samples whose files failed later (at decoding), reporting why."""
        self.train = [s for s in self.train if s.item.path not in failed]
        self.validation = [s for s in self.validation if s.item.path not in failed]
        self.issues.extend(issues)


def _frame_starts(info: MediaInfo, config: dict[str, Any]) -> list[float] | None:
    """Keyframes and scene cuts, read from the file, where the keyframe strategy needs them."""
    if not info.is_video or config["video_config"]["frame_sample_strategy"] != "keyframe":
        return None
    until = min(info.duration, config["video_config"]["max_duration"])
    return sorted(set(keyframe_times(info.path, until=until)) | set(scene_cut_times(info.path, until=until)))


def plan_samples(
    items: list[Item],
    infos: dict[Path, MediaInfo],
    config: dict[str, Any],
    adapter: ModelAdapter,
    hasher: ContentHasher,
    vae_dtype: str,
    text_dtype: str,
    variants: int | None = None,
    issues: list[Issue] | None = None,
) -> list[PlannedSample]:
    """variants: how many cached variants per clip; None for the settings' own (variant_count).

    Frame counts are rounded down to what the model accepts (adapter.frame_rule); a file that offers
    fewer frames than its shortest accepted count is left out, with an Issue appended to `issues`.
    """
    vae_identity, text_identity = adapter.vae_identity(), adapter.text_identity()
    video_config = {**config["video_config"], "temporal_compression_ratio": adapter.temporal_ratio}
    rule = adapter.frame_rule
    refused = issues if issues is not None else []
    planned = []
    for item in items:
        info = infos[item.path]
        if not info.is_video and not rule.accepts(1):
            refused.append(Issue(item.path, (
                f"a still image is one frame, which {adapter.family} does not accept ({rule.describe()}); "
                "leave images out of this dataset")))
            continue
        if info.is_video and rule.stills_only:
            # An image model trains on stills. One frame picked from a clip would be an arbitrary
            # still under a caption written for motion, and each variant another one: left out by name.
            refused.append(Issue(item.path, (
                f"a video clip, and {adapter.family} is an image model that trains on still images; "
                "leave videos out of this dataset, or save the frames you need as images")))
            continue
        content = hasher.hash(item.path)
        starts = _frame_starts(info, config)
        try:
            plans = tuple(
                plan_frames(
                    info,
                    frames=config["frames"],
                    video_config=video_config,
                    variant=v,
                    seed=config["seed"],
                    content_key=content,
                    starts=starts,
                    frame_rule=rule,
                )
                for v in range(variant_count(config, info.is_video) if variants is None else variants)
            )
        except NoAcceptedFrameCount as e:
            refused.append(Issue(item.path, (
                f"too short for {adapter.family}: {e}; use a longer clip, or raise video_config.max_frames or "
                "video_config.max_duration if they cut it")))
            continue
        if adapter.fixed_size is not None:  # one size only: every clip scaled and cropped to it
            bucket = Bucket(len(plans[0].times), *adapter.fixed_size)
        else:
            bucket = assign_bucket(info.width, info.height, len(plans[0].times), config["resolution"], adapter.size_divisor)
        upscaled = upscale_warning(info.width, info.height, bucket, info.kind)
        if upscaled:  # the doctor says the same (a warning: the file still trains)
            refused.append(Issue(item.path, upscaled, fatal=False))
        keys = tuple(
            latent_key(
                content,
                vae_identity,
                bucket,
                plan.times,
                plan.reversed,
                info.rotation,
                vae_dtype=vae_dtype,
                pipeline=PIPELINE_VERSION,
            )
            for plan in plans
        )
        caption_key = text_key(item.caption, text_identity, adapter.max_text_length, text_dtype)
        # A text encoder that reads the first frame: one entry per variant, keyed by its latents' key too.
        frame_keys = tuple(text_key(item.caption, f"{text_identity}|{key}", adapter.max_text_length, text_dtype)
                           for key in keys) if getattr(adapter, "text_takes_image", False) else ()
        planned.append(PlannedSample(item, info, content, bucket, plans, keys, frame_keys[0] if frame_keys else caption_key, frame_keys))
    hasher.save()
    return planned


def plan_data(
    config: dict[str, Any],
    adapter: ModelAdapter,
    hasher: ContentHasher,
    *,
    progress: Callable[[str], None] | None = None,
) -> DataPlan:
    """Discover, probe, split off validation and plan every sample; raise UserError when nothing
    can train, or (with strict_data) when anything is unusable."""
    say = progress or (lambda message: None)
    rule = adapter.frame_rule
    if rule.round_down(config["frames"]) is None:
        raise ConfigError(f"frames {config['frames']}: {adapter.family} accepts {rule.describe()} frames; "
                          f"set frames to {rule.first} or more", key="frames")
    items, issues = discover_datasets(config)
    validation_items, validation_issues = discover_validation(config)
    issues += validation_issues
    say(f"probing {len(items) + len(validation_items)} files")
    infos = probe_all([i.path for i in items + validation_items])
    usable: dict[Path, MediaInfo] = {}
    for path, result in infos.items():
        if isinstance(result, UnusableMedia):
            issues.append(Issue(path, str(result)))
        else:
            usable[path] = result
    items = [i for i in items if i.path in usable]
    validation_items = [i for i in validation_items if i.path in usable]
    fatal = [issue for issue in issues if issue.fatal]
    if fatal and config["strict_data"]:
        raise UserError(f"strict_data: {len(fatal)} file(s) cannot be used, first {fatal[0]}; fix them or turn strict_data off")
    for issue in issues:
        log.warning("%s", issue)
    train_items, held_out = split_holdout(items, config, validation=validation_items or None)
    if not train_items:
        why = f"; first problem: {fatal[0]}" if fatal else ""
        raise UserError(f"no usable clips or images with captions in the configured datasets{why} (run 'main.py doctor' for a report)")
    say(f"planning {len(train_items)} training and {len(held_out)} validation samples")
    vae_dtype = compute_dtype(config["vae"]["weight_dtype"])
    # The cached encoders' only: a kept one (keep_loaded) encodes during the steps, not into the cache.
    text_weights = {name: dtype for name, dtype in text_weight_dtypes(adapter, config).items()
                    if name in adapter.cached_text_encoders}
    names = (str(vae_dtype).removeprefix("torch."), "+".join(_text_dtype_name(w) for w in text_weights.values()))
    refused: list[Issue] = []  # files offering no frame count the model accepts
    train = plan_samples(train_items, usable, config, adapter, hasher, *names, issues=refused)
    # Validation reads variant 0 only (the same frames at every evaluation): no other is cached.
    validation = plan_samples(held_out, usable, config, adapter, hasher, *names, variants=1, issues=refused)
    left_out = [issue for issue in refused if issue.fatal]
    if left_out and config["strict_data"]:
        raise UserError(f"strict_data: {len(left_out)} file(s) cannot be used, first {left_out[0]}; fix them or turn strict_data off")
    for issue in refused:
        log.warning("%s", issue)
    if not train:
        raise UserError(f"no clip or image the model can train on; first problem: {left_out[0]}")
    drops = any(s.item.caption_dropout > 0 for s in train)
    if drops and adapter.text_takes_image:
        # Its text conditions are read with each clip's first frame: there is no one empty caption's entry.
        raise ConfigError(f"caption_dropout is not supported for {adapter.family}: its text encoder reads each clip's "
                          "first frame with the caption; set caption_dropout to 0 in every dataset",
                          key="datasets.caption_dropout")
    return DataPlan(
        train,
        validation,
        issues + refused,
        vae_dtype=vae_dtype,
        text_weight_dtypes=text_weights,
        empty_text_key=text_key("", adapter.text_identity(), adapter.max_text_length, names[1]) if drops else None,
    )


def _text_dtype_name(weight_dtype: str) -> str:
    """One encoder's part of the text keys: its compute dtype, and its quantized storage where it has one."""
    name = str(compute_dtype(weight_dtype)).removeprefix("torch.")
    if is_quantized_dtype(weight_dtype):
        name += f"-{weight_dtype.lower()}"  # a quantized encoder's embeddings are its own, never a bfloat16 one's
    return name
