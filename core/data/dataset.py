"""The train-time side of the data pipeline: cached entries -> batches, in background workers.

By the time training starts every sample variant's latents and every caption's embeddings are in
the caches (core.data.cache), so a batch is a few small file reads: no decoding, no encoders.
The batch sampler (core.data.buckets.BucketBatchSampler) decides which (sample, use) pairs form
each step's batch; use u takes cached variant u mod (the sample's variant count). Frame dropout is
applied to the stacked batch in the worker, with a generator seeded by (seed, step), so batches
are the same with any number of workers and after a resume.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .augment import drop_frames
from .cache import LatentCache, TextCache
from .workers import WorkerLifeline

logger = logging.getLogger(__name__)

Item = tuple[Hashable, int, int]  # (sample id, use, step)


class MissingCacheEntry(LookupError):
    """A sample's cache entry is missing or damaged at train time: the caching pass must run again."""


@dataclass(frozen=True)
class CachedSample:
    """One training sample as the caches know it: its latents' key per variant, its caption's key."""

    latent_keys: tuple[str, ...]
    text_key: str

    def __post_init__(self) -> None:
        if not self.latent_keys:
            raise ValueError("a cached sample needs at least one latent key")


class CachedSampleDataset(Dataset):
    """Maps (sample id, use, step) to that sample's cached tensors for variant use % variants.

    samples is a sequence (ids are indices) or a mapping from the sampler's sample ids. Only paths
    and keys are held, so the dataset pickles cheaply into worker processes (spawn on Windows).
    """

    # Text entries are the same at every use of a clip, so each process keeps those it has read,
    # up to this many bytes. Kept first-come rather than least-recently-used: passes visit the
    # clips in a new random order, which would make an LRU smaller than the set evict everything.
    TEXT_MEMO_BYTES = 64 * 1024 * 1024

    def __init__(self, samples: Sequence[CachedSample] | Mapping[Hashable, CachedSample], cache_dir: str | Path) -> None:
        self.samples = samples
        self.latents = LatentCache(cache_dir)
        self.text = TextCache(cache_dir)
        self._text_memo: dict[str, dict[str, torch.Tensor]] = {}
        self._text_memo_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        # Workers start with an empty memo: pickling it to a spawned worker would cost more than it saves.
        return {**self.__dict__, "_text_memo": {}, "_text_memo_bytes": 0}

    def __len__(self) -> int:
        return len(self.samples)

    def _text_entry(self, key: str) -> dict[str, torch.Tensor] | None:
        entry = self._text_memo.get(key)
        if entry is None:
            entry = self.text.get(key)
            size = sum(t.numel() * t.element_size() for t in entry.values()) if entry else 0
            if entry is not None and self._text_memo_bytes + size <= self.TEXT_MEMO_BYTES:
                self._text_memo[key] = entry
                self._text_memo_bytes += size
        return entry

    def __getitem__(self, item: Item) -> dict[str, Any]:
        sample_id, use, step = item
        variant = int(use) % len(self.samples[sample_id].latent_keys)  # type: ignore[index]
        return {**self.load(sample_id, variant), "sample_id": sample_id, "variant": variant, "step": int(step)}

    def load(self, sample_id: Hashable, variant: int) -> dict[str, torch.Tensor]:
        """{"latents": (C, f, h, w), "prompt_embeds": (tokens, D), "prompt_mask": (L,)} of one variant.

        prompt_embeds as stored: trimmed to the caption's tokens (the collate pads them to L).
        """
        sample = self.samples[sample_id]  # type: ignore[index]
        latent_key = sample.latent_keys[variant]
        latents = self.latents.get(latent_key)
        if latents is None:
            raise MissingCacheEntry(f"sample {sample_id!r}: latents {latent_key} (variant {variant}) are not in {self.latents.root}")
        text = self._text_entry(sample.text_key)
        if text is None:
            raise MissingCacheEntry(f"sample {sample_id!r}: text embeddings {sample.text_key} are not in {self.text.root}")
        return {**latents, **text}


def step_seed(seed: int, step: int, stream: str = "frame-dropout") -> int:
    """A seed for (run seed, step), stable across processes and platforms."""
    digest = hashlib.sha256(f"{stream}:{int(seed)}:{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class BatchCollator:
    """Stacks one bucket's samples and applies frame dropout seeded by (seed, step). Picklable."""

    def __init__(self, seed: int = 0, frame_dropout_probability: float = 0.0, frame_channels: int | None = None) -> None:
        self.seed = int(seed)
        self.frame_dropout_probability = float(frame_dropout_probability)
        # Cached entries may carry conditioning channels after the video's own (an image-to-video
        # model's first-frame latents); frame dropout stutters the video, never the condition.
        self.frame_channels = frame_channels

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        shapes = {tuple(s["latents"].shape) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"a batch must hold one bucket's samples; got latent shapes {sorted(shapes)}")
        step = samples[0]["step"]
        latents = torch.stack([s["latents"] for s in samples])
        if self.frame_dropout_probability > 0:
            generator = torch.Generator().manual_seed(step_seed(self.seed, step))
            if self.frame_channels is None or self.frame_channels >= latents.shape[1]:
                latents = drop_frames(latents, self.frame_dropout_probability, generator)
            else:
                video = drop_frames(latents[:, : self.frame_channels], self.frame_dropout_probability, generator)
                latents = torch.cat([video, latents[:, self.frame_channels :]], dim=1)
        mask = torch.stack([s["prompt_mask"] for s in samples])
        in_worker = get_worker_info() is not None
        # In a worker, pad only to the batch's longest caption: the zeros up to the full length
        # are added after the trip to the training process, so they do not travel.
        embeds = [s["prompt_embeds"] for s in samples]
        width = max(e.shape[0] for e in embeds) if in_worker else mask.shape[1]
        prompt_embeds = torch.zeros((len(samples), width, embeds[0].shape[1]), dtype=embeds[0].dtype)
        for row, e in enumerate(embeds):
            prompt_embeds[row, : e.shape[0]] = e
        batch = {
            "latents": latents,
            "prompt_embeds": prompt_embeds,
            "prompt_mask": mask,
            "variants": torch.tensor([s["variant"] for s in samples], dtype=torch.long),
            "sample_ids": [s["sample_id"] for s in samples],
            "step": step,
        }
        return PackedBatch(batch, pad={"prompt_embeds": mask.shape[1]}) if in_worker else batch


class PackedBatch:
    """A batch's tensors in one buffer, for the trip from a worker process to the training loop.

    Sent as it is, each tensor would cross through shared memory with its own file-descriptor
    handshake with the worker (about a millisecond each, measured: more than reading the batch from
    the cache). One buffer costs one handshake; a small one (under BY_VALUE_LIMIT) is copied through
    the pipe instead, which is faster still. The loader unpacks it into views of the buffer.
    """

    ALIGN = 64  # every tensor starts at a multiple of this, so each view is well aligned
    BY_VALUE_LIMIT = 2 * 1024 * 1024

    def __init__(self, batch: dict[str, Any], pad: dict[str, int] | None = None) -> None:
        """pad: tensors to zero-pad along dim 1 to this length on unpacking."""
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        self.rest = {k: v for k, v in batch.items() if k not in tensors}
        self.pad = dict(pad or {})
        self.layout: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
        size = 0
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            self.layout.append((name, tensor.dtype, tuple(tensor.shape), size, nbytes))
            size += -(-nbytes // self.ALIGN) * self.ALIGN
        self.buffer = torch.empty(size, dtype=torch.uint8)
        if size > self.BY_VALUE_LIMIT:
            self.buffer.share_memory_()  # before the copies: sharing a filled buffer would copy it again
        for name, dtype, shape, offset, nbytes in self.layout:
            self.buffer[offset : offset + nbytes].view(dtype).view(shape).copy_(tensors[name])

    def __reduce__(self) -> tuple[Any, ...]:
        small = self.buffer.numel() <= self.BY_VALUE_LIMIT
        buffer = self.buffer.numpy() if small else self.buffer  # numpy pickles by value
        return (PackedBatch._rebuild, (buffer, self.layout, self.rest, self.pad))

    @staticmethod
    def _rebuild(buffer: Any, layout: list, rest: dict[str, Any], pad: dict[str, int]) -> PackedBatch:
        packed = PackedBatch.__new__(PackedBatch)
        packed.buffer = buffer if isinstance(buffer, torch.Tensor) else torch.from_numpy(buffer)
        packed.layout, packed.rest, packed.pad = layout, rest, pad
        return packed

    def pin_memory(self) -> PackedBatch:
        self.buffer = self.buffer.pin_memory()  # one pinned buffer for the whole batch
        return self

    def unpack(self) -> dict[str, Any]:
        out = {name: self.buffer[o : o + n].view(dtype).view(shape) for name, dtype, shape, o, n in self.layout}
        for name, length in self.pad.items():
            t = out[name]
            full = torch.zeros((t.shape[0], length, *t.shape[2:]), dtype=t.dtype, pin_memory=self.buffer.is_pinned())
            full[:, : t.shape[1]] = t
            out[name] = full
        return {**out, **self.rest}


class BatchLoader:
    """Iterates a DataLoader, unpacking batches that come from worker processes."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # The DataLoader's iterator is made here, not at the first next(): making it draws a seed from
        # torch's global generator, and a resumed run restores that generator right after this call.
        return self._unpacked(iter(self.loader))

    @staticmethod
    def _unpacked(batches: Iterator[Any]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            yield batch.unpack() if isinstance(batch, PackedBatch) else batch

    def close(self) -> None:
        """End the worker processes now; the next iteration would start new ones.

        Persistent workers otherwise live as long as the DataLoader's iterator, which outlives the run
        wherever something still holds it: a reference cycle, or the traceback of the run's exception
        that a window keeps for its error dialog.
        """
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is None:
            return
        self.loader._iterator = None
        # torch has no public way to end a persistent iterator's workers; this is what its __del__ calls.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def collate_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one bucket's samples, without frame dropout."""
    return BatchCollator()(samples)


class StepBatches:
    """Turns a batch sampler's batches into lists of (sample id, use, step) for the DataLoader.

    Accepts core.data.buckets.Batch (its .samples are (sample id, use) pairs and .step is its step)
    or plain lists of (sample id, use) pairs, numbered from start_step.
    """

    def __init__(self, batches: Iterable[Any], start_step: int = 0) -> None:
        self.batches = batches
        self.start_step = int(start_step)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[Item]]:
        for number, batch in enumerate(self.batches, start=self.start_step):
            pairs = getattr(batch, "samples", batch)
            step = getattr(batch, "step", number)
            yield [(sample_id, int(use), int(step)) for sample_id, use in pairs]


def make_loader(
    dataset: CachedSampleDataset,
    batch_sampler: Iterable[Any],
    num_workers: int,
    pin_memory: bool,
    *,
    seed: int = 0,
    frame_dropout_probability: float = 0.0,
    frame_channels: int | None = None,
    start_step: int = 0,
    prefetch_factor: int = 4,
    multiprocessing_context: str | None = None,
) -> BatchLoader:
    """A DataLoader over the cache (as .loader): one batch per item of batch_sampler, loaded ahead.

    num_workers > 0 keeps the workers alive between iterations and has each hold prefetch_factor
    batches ready, so a training step never waits for a warm cache; they end with the process that
    iterates the loader, however it ends (core.data.workers), or at close(). Memory is pinned only
    where CUDA is available (it does nothing elsewhere but warn).
    """
    workers = max(0, int(num_workers))
    options: dict[str, Any] = {}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=max(1, int(prefetch_factor)),
                       worker_init_fn=WorkerLifeline())
        if multiprocessing_context:
            options["multiprocessing_context"] = multiprocessing_context
    return BatchLoader(DataLoader(
        dataset,
        batch_sampler=StepBatches(batch_sampler, start_step),
        num_workers=workers,
        collate_fn=BatchCollator(seed, frame_dropout_probability, frame_channels),
        pin_memory=bool(pin_memory) and torch.cuda.is_available(),
        **options,
    ))
