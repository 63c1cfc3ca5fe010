"""Fill the caches a data plan needs: VAE latents of every sample variant and text embeddings of
every caption, computing only the entries that are missing.

Decoding runs in background threads (PyAV releases the GIL) while the VAE encodes on the main
thread. A file that fails to decode is left out and reported, never crashing the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.memory.caching import CAPTION_BATCH
from core.models.base import ModelAdapter
from core.models.conditions import load_text_encoders

from .cache import LatentCache, TextCache, seed_from_key
from .decode import decode_frames, fit_to_bucket
from .frames import FramePlan
from .media import Issue, UnusableMedia
from .plan import DataPlan, PlannedSample

log = logging.getLogger(__name__)

TEXT_BATCH = CAPTION_BATCH  # captions per encode_text call; the estimate's caching figure counts as many


@dataclass
class CacheReport:
    latents_computed: int = 0
    latents_reused: int = 0
    texts_computed: int = 0
    texts_reused: int = 0
    failed: list[Issue] = field(default_factory=list)

    def summary(self) -> str:
        failed = f", {len(self.failed)} file(s) failed and were left out" if self.failed else ""
        return (
            f"latents: {self.latents_computed} computed, {self.latents_reused} already cached; "
            f"captions: {self.texts_computed} computed, {self.texts_reused} already cached{failed}"
        )


def sample_pixels(sample: PlannedSample, plan: FramePlan) -> np.ndarray:
    """One variant's frames as the VAE sees them: uint8 (F, H, W, 3) at the bucket's size, in play order."""
    frames = decode_frames(sample.item.path, plan.times, sample.info)
    frames = fit_to_bucket(frames, sample.bucket.height, sample.bucket.width)
    return frames[::-1].copy() if plan.reversed else frames


def _to_vae_input(frames: np.ndarray) -> Any:
    import torch

    # (F, H, W, 3) uint8 -> (1, 3, F, H, W) in [-1, 1]
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)
    return video.unsqueeze(0)


def _missing_latents(plan: DataPlan, cache: LatentCache, report: CacheReport) -> list[tuple[PlannedSample, FramePlan, str]]:
    todo, seen = [], set()
    for sample in plan.train + plan.validation:
        for frame_plan, key in zip(sample.plans, sample.latent_keys):
            if key in seen:
                continue  # two variants with the same frames share one entry
            seen.add(key)
            if cache.has(key):
                report.latents_reused += 1
            else:
                todo.append((sample, frame_plan, key))
    return todo


def _decoded(todo: list[tuple[PlannedSample, FramePlan, str]], workers: int) -> Iterator[tuple[PlannedSample, str, np.ndarray | UnusableMedia]]:
    """Decode ahead in threads, yielding in order; a decoding failure is yielded, not raised."""

    def one(job: tuple[PlannedSample, FramePlan, str]) -> np.ndarray | UnusableMedia:
        sample, frame_plan, _ = job
        try:
            return sample_pixels(sample, frame_plan)
        except UnusableMedia as e:
            return e
        except Exception as e:  # a decoder bug on one file must not stop the others
            log.exception("decoding %s failed unexpectedly", sample.item.path)
            return UnusableMedia(f"cannot be decoded ({type(e).__name__}: {e})")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # map() keeps order and runs ahead of the consumer by the pool's size.
        for (sample, _, key), result in zip(todo, pool.map(one, todo)):
            yield sample, key, result


def _missing_texts(plan: DataPlan, texts: TextCache, layout: dict[str, Any], report: CacheReport,
                   with_images: bool) -> list[tuple[str, str, tuple[PlannedSample, FramePlan] | None]]:
    """(key, caption, the variant whose first frame the encoder reads, or None) of each text entry to make."""
    todo: list[tuple[str, str, tuple[PlannedSample, FramePlan] | None]] = []
    seen: set[str] = set()
    for sample in plan.train + plan.validation:
        keys = sample.text_keys if with_images and sample.text_keys else (sample.text_key,)
        for variant, key in enumerate(keys):
            if key in seen:
                continue
            seen.add(key)
            if texts.has(key, layout):  # an entry lacking a key the family returns is made again
                report.texts_reused += 1
            else:
                todo.append((key, sample.item.caption, (sample, sample.plans[variant]) if with_images else None))
    return todo


def fill_caches(
    plan: DataPlan,
    adapter: ModelAdapter,
    cache_dir: str | Path,
    *,
    device: str = "cpu",
    workers: int = 2,
    progress: Callable[[str, int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CacheReport:
    """Compute every missing cache entry of the plan. Files that fail are dropped from the plan."""
    import torch

    report = CacheReport()
    latents, texts = LatentCache(cache_dir), TextCache(cache_dir)
    tick = progress or (lambda what, done, total: None)
    stop = should_stop or (lambda: False)

    todo = _missing_latents(plan, latents, report)
    failed: set[Path] = set()
    if todo:
        adapter.load_vae(device, plan.vae_dtype or torch.float32)
        for done, (sample, key, result) in enumerate(_decoded(todo, workers), start=1):
            if stop():
                break
            if sample.item.path in failed:
                continue
            if isinstance(result, UnusableMedia):
                failed.add(sample.item.path)
                report.failed.append(Issue(sample.item.path, str(result)))
                log.warning("%s: %s; left out of training", sample.item.path, result)
                continue
            generator = torch.Generator(device="cpu").manual_seed(seed_from_key(key))
            encoded = adapter.encode_video(_to_vae_input(result), generator=generator)[0]
            latents.put(key, {"latents": encoded.cpu().contiguous()}, {"file": str(sample.item.path)})
            report.latents_computed += 1
            tick("latents", done, len(todo))
        adapter.unload_encoders()
    plan.drop(failed, report.failed)

    layout = adapter.condition_layout()
    missing = _missing_texts(plan, texts, layout, report, bool(getattr(adapter, "text_takes_image", False)))
    if plan.empty_text_key is not None:  # what a dropped caption trains on (caption_dropout)
        if texts.has(plan.empty_text_key, layout):
            report.texts_reused += 1
        else:
            missing.append((plan.empty_text_key, "", None))
    if missing and not stop():
        load_text_encoders(adapter, device, plan.text_weight_dtypes, list(plan.text_weight_dtypes))  # the cached ones
        for start in range(0, len(missing), TEXT_BATCH):
            chunk = missing[start : start + TEXT_BATCH]
            if chunk[0][2] is None:
                encoded = adapter.encode_text([caption for _, caption, _ in chunk])
            else:
                # The text encoder reads each variant's first frame, as its pipeline reads the start image.
                images = [sample_pixels(*job)[0] for _, _, job in chunk]
                encoded = adapter.encode_text([caption for _, caption, _ in chunk], images=images)  # type: ignore[call-arg]
            for row, (key, _, _) in enumerate(chunk):
                texts.put_conditions(key, {name: encoded[name][row].cpu() for name in layout}, layout)
                report.texts_computed += 1
            tick("captions", start + len(chunk), len(missing))
        adapter.unload_encoders()
    return report
