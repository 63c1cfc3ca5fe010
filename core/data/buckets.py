"""Buckets and the batch sampler: every batch holds samples of one (frames, height, width) shape.

Plain Python on purpose (no torch): the doctor plans buckets without loading torch, and the
dataset wraps BucketBatchSampler in a DataLoader. See docs/data-pipeline.md, "Buckets".
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterator, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

MIN_ASPECT = 1 / 4  # width / height of the narrowest bucket (portrait 1:4)
MAX_ASPECT = 4.0  # and of the widest (landscape 4:1)


class Bucket(NamedTuple):
    """The shape of one sample: frames (1 for images), height and width in pixels."""

    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


class SampleRecord(NamedTuple):
    """What the sampler needs to know about one item."""

    sample_id: Hashable
    bucket: Bucket
    repeats: int
    is_video: bool


class Batch(NamedTuple):
    """One step's batch: its step number, pass (epoch) and the samples with each one's use number.

    A sample's use number counts its uses over the run (pass * repeats + repeat), so the caller can
    take cached variant `use % cache_variants` and each use of a clip gets the next variant.
    """

    step: int
    pass_index: int
    bucket: Bucket
    is_video: bool
    samples: tuple[tuple[Hashable, int], ...]  # (sample_id, use)

    @property
    def sample_ids(self) -> tuple[Hashable, ...]:
        return tuple(s for s, _ in self.samples)


@lru_cache(maxsize=64)
def bucket_sizes(resolution: int, divisor: int, min_aspect: float = MIN_ASPECT, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """Candidate (height, width) pairs: area about resolution², both sides multiples of divisor,
    aspect ratios (width / height) from min_aspect to max_aspect, sorted from tall to wide."""
    if resolution < 1 or divisor < 1:
        raise ValueError(f"resolution and divisor must be positive, got {resolution} and {divisor}")
    area = resolution * resolution
    sizes: set[tuple[int, int]] = set()
    # Walk the short side up to the square; the long side is the multiple that best keeps the area.
    # Mirroring gives portrait and landscape the same choices.
    short = divisor
    while short * short <= area * 1.5:
        long = max(divisor, round(area / short / divisor) * divisor)
        if long >= short:
            if long / short <= max_aspect:
                sizes.add((short, long))  # landscape: height is the short side
            if short / long >= min_aspect:
                sizes.add((long, short))
        short += divisor
    if not sizes:
        side = max(divisor, round(resolution / divisor) * divisor)
        sizes.add((side, side))
    return sorted(sizes, key=lambda hw: (hw[1] / hw[0], hw[0]))


def assign_bucket(width: int, height: int, frames: int, resolution: int, divisor: int) -> Bucket:
    """The bucket whose aspect ratio is closest (in log ratio) to a width x height picture's."""
    if width < 1 or height < 1:
        raise ValueError(f"a picture needs a positive size, got {width}x{height}")
    target = math.log(width / height)
    h, w = min(bucket_sizes(resolution, divisor), key=lambda hw: (abs(math.log(hw[1] / hw[0]) - target), -hw[0] * hw[1]))
    return Bucket(frames, h, w)


# Above this scale a file is stretched enough to train visibly soft: fit_to_bucket scales it to
# cover its bucket, and 1.5x is where interpolation blur shows at the sizes these models train.
UPSCALE_WARNING = 1.5


def upscale_warning(width: int, height: int, bucket: Bucket, kind: str) -> str:
    """The warning for a file its bucket scales up by more than UPSCALE_WARNING, or ""."""
    scale = max(bucket.height / height, bucket.width / width)  # what fit_to_bucket scales it by
    if scale <= UPSCALE_WARNING:
        return ""
    what = "image" if kind == "image" else "clip"
    return (f"scaled up {scale:.1f}x from {width}x{height} to fill its {bucket.width}x{bucket.height} bucket, so it trains "
            f"blurred; use a larger {what}, or a lower resolution")


def video_batch_size(batch_size: int, multiplier: float) -> int:
    """Samples in a video batch: batch_size scaled by the multiplier, rounded half up, at least 1."""
    return max(1, math.floor(batch_size * multiplier + 0.5))


def _as_records(records: Sequence[Any]) -> list[SampleRecord]:
    out = []
    for r in records:
        sample_id, bucket, repeats, is_video = r
        out.append(SampleRecord(sample_id, Bucket(*bucket), int(repeats), bool(is_video)))
    return out


def _group_sizes(records: Sequence[SampleRecord]) -> dict[tuple[Bucket, bool], int]:
    """(bucket, is_video) -> samples per pass. Videos and images never share a batch, since their
    batch sizes differ (a one-frame video and an image could otherwise meet in a frames=1 bucket)."""
    counts: dict[tuple[Bucket, bool], int] = {}
    for r in records:
        key = (r.bucket, r.is_video)
        counts[key] = counts.get(key, 0) + max(0, r.repeats)
    return counts


def steps_per_epoch(records: Sequence[Any], batch_size: int, multiplier: float, world_size: int = 1) -> int:
    """Batches in one pass over every (item, repeat); the same for every pass.

    batch_size is per process: with world_size processes a (global) batch holds world_size times
    the per-process image and video batch sizes."""
    video_bs = video_batch_size(batch_size, multiplier) * world_size
    image_bs = batch_size * world_size
    return sum(
        math.ceil(n / (video_bs if is_video else image_bs)) for (_, is_video), n in _group_sizes(_as_records(records)).items()
    )


def total_batches(config: dict[str, Any], records: Sequence[Any], world_size: int = 1) -> int:
    """Batches the run draws: max_steps optimizer steps, or epochs passes, each optimizer step taking
    gradient_accumulation_steps batches. This is the sampler's `steps` (global batches when
    world_size processes share each one)."""
    accumulation = int(config.get("gradient_accumulation_steps", 1))
    if config.get("stop_after") == "EPOCHS":
        per_epoch = steps_per_epoch(
            records, config["batch_size"], config["video_config"]["video_batch_size_multiplier"], world_size
        )
        # Whole optimizer steps: the last one may reach a little into the next pass.
        return math.ceil(int(config["epochs"]) * per_epoch / accumulation) * accumulation
    return int(config["max_steps"]) * accumulation


class BucketBatchSampler:
    """Yields `steps` Batches, looping over the data in passes (see docs/data-pipeline.md, "Buckets").

    Pass p shuffles every (item, repeat) with random.Random seeded by (seed, p), cuts each bucket's
    share into batches and shuffles the batch order. Every pass has the same number of batches, so
    starting at start_step jumps straight to its pass: the sequence from there is the same as an
    uninterrupted run's.

    batch_size is per process. With world_size > 1 the sampler yields global batches of world_size
    times the per-process sizes (images: batch_size, videos: video_batch_size(batch_size,
    multiplier)); every process builds the same sampler and takes its share with ShardedBatchSampler.
    """

    def __init__(
        self,
        records: Sequence[Any],
        batch_size: int,
        video_batch_size_multiplier: float,
        seed: int,
        steps: int,
        start_step: int = 0,
        world_size: int = 1,
    ):
        self.records = _as_records(records)
        if int(world_size) < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.world_size = int(world_size)
        # Global sizes: what all processes together take per batch.
        self.batch_size = int(batch_size) * self.world_size
        self.video_batch_size = video_batch_size(batch_size, video_batch_size_multiplier) * self.world_size
        self.seed = int(seed)
        self.steps = int(steps)
        self.start_step = int(start_step)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= self.start_step <= self.steps:
            raise ValueError(f"start_step {start_step} is outside 0..{steps}")
        self.per_pass = steps_per_epoch(self.records, int(batch_size), video_batch_size_multiplier, self.world_size)
        if self.per_pass == 0 and self.steps > 0:
            raise ValueError("no samples to draw batches from")

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        step = self.start_step
        while step < self.steps:
            pass_index, offset = divmod(step, self.per_pass)
            for batch in self.pass_batches(pass_index)[offset:]:
                if step >= self.steps:
                    return
                yield batch._replace(step=step)
                step += 1

    def pass_batches(self, pass_index: int) -> list[Batch]:
        """The batches of one pass, in order (their step fields are placeholders)."""
        # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms.
        rng = random.Random(f"{self.seed}:{pass_index}")
        draws = [(r, k) for r in self.records for k in range(r.repeats)]
        rng.shuffle(draws)
        groups: dict[tuple[Bucket, bool], list[tuple[Hashable, int]]] = {}
        for record, k in draws:
            use = pass_index * record.repeats + k
            groups.setdefault((record.bucket, record.is_video), []).append((record.sample_id, use))
        batches = []
        for (bucket, is_video), samples in sorted(groups.items()):
            size = self.video_batch_size if is_video else self.batch_size
            for i in range(0, len(samples), size):
                batches.append(Batch(-1, pass_index, bucket, is_video, tuple(samples[i : i + size])))
        rng.shuffle(batches)
        return batches


def shard_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """One process's share of a global batch when world_size processes train together (DDP).

    The batch is first padded to a multiple of world_size by repeating its own samples from the
    start (same bucket, so the shapes agree), then process `rank` takes samples rank, rank +
    world_size, rank + 2 * world_size, ... Every process gets the same number of samples, so the
    mean of the per-process mean losses that DDP's gradient averaging computes is the mean over the
    global batch. Local sample j is sample `rank + j * world_size` of the padded global batch (see
    `shard_positions`). With world_size 1 the batch is returned as it is.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if world_size == 1:
        return batch
    samples = batch.samples
    if not samples:
        raise ValueError(f"batch {batch.step} has no samples to share")
    padded = -(-len(samples) // world_size) * world_size
    full = tuple(samples[i % len(samples)] for i in range(padded))
    return batch._replace(samples=full[rank::world_size])


def shard_positions(count: int, rank: int, world_size: int) -> list[int]:
    """The positions in the (padded) global batch of a process's `count` samples from shard_batch."""
    return [rank + j * world_size for j in range(count)]


class ShardedBatchSampler:
    """A batch sampler's batches, each cut down to this process's share (see shard_batch).

    Every process builds the same sampler (same records, seed and global batch size) and wraps it
    with its own rank: together the processes see exactly the samples of each global batch.
    """

    def __init__(self, sampler: Any, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.sampler = sampler
        self.rank = int(rank)
        self.world_size = int(world_size)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.sampler:
            yield shard_batch(batch, self.rank, self.world_size)
