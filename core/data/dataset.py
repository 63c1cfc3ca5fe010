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
from .cache import LatentCache, StoredCondition, TextCache, stored_conditions
from .workers import WorkerLifeline

# An item's key for its caption's condition padding ({key: (spec, length)}, from the text cache),
# which the collate pads each condition by; it does not reach the batch.
PADDING = "condition_padding"

logger = logging.getLogger(__name__)

Item = tuple[Hashable, int, int]  # (sample id, use, step)


class MissingCacheEntry(LookupError):
    """A sample's cache entry is missing or damaged at train time: the caching pass must run again."""


@dataclass(frozen=True)
class CachedSample:
    """One training sample as the caches know it: its latents' key per variant, its caption's key."""

    latent_keys: tuple[str, ...]
    text_key: str
    caption_dropout: float = 0.0  # chance a use trains on the empty caption (its dataset's setting)
    loss_weight: float = 1.0  # what its loss is multiplied by (its dataset's setting)
    text_keys: tuple[str, ...] = ()  # one per variant, where the text conditions depend on the first frame

    def text_key_of(self, variant: int) -> str:
        return self.text_keys[variant] if self.text_keys else self.text_key

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

    def __init__(self, samples: Sequence[CachedSample] | Mapping[Hashable, CachedSample], cache_dir: str | Path,
                 *, seed: int = 0, empty_text_key: str | None = None) -> None:
        """empty_text_key: the empty caption's entry, which a sample with caption_dropout trains on
        when its draw for (seed, step, sample, use) says so; needed where any sample drops captions."""
        self.samples = samples
        self.seed = int(seed)
        self.empty_text_key = empty_text_key
        self.latents = LatentCache(cache_dir)
        self.text = TextCache(cache_dir)
        self._text_memo: dict[str, tuple[dict[str, torch.Tensor], dict[str, StoredCondition]]] = {}
        self._text_memo_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        # Workers start with an empty memo: pickling it to a spawned worker would cost more than it saves.
        return {**self.__dict__, "_text_memo": {}, "_text_memo_bytes": 0}

    def __len__(self) -> int:
        return len(self.samples)

    def _text_entry(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, StoredCondition]] | None:
        entry = self._text_memo.get(key)
        if entry is None:
            entry = self.text.get_trimmed(key)
            size = sum(t.numel() * t.element_size() for t in entry[0].values()) if entry else 0
            if entry is not None and self._text_memo_bytes + size <= self.TEXT_MEMO_BYTES:
                self._text_memo[key] = entry
                self._text_memo_bytes += size
        return entry

    def __getitem__(self, item: Item) -> dict[str, Any]:
        sample_id, use, step = item
        sample = self.samples[sample_id]  # type: ignore[index]
        variant = int(use) % len(sample.latent_keys)
        dropped = caption_dropped(sample.caption_dropout, self.seed, int(step), sample_id, int(use))
        if dropped and self.empty_text_key is None:
            raise ValueError(f"sample {sample_id!r} drops its caption (caption_dropout), and the dataset was given no empty caption's key")
        return {**self.load(sample_id, variant, empty_caption=dropped), "sample_id": sample_id, "variant": variant,
                "step": int(step), "caption_dropped": dropped, "loss_weight": float(sample.loss_weight)}

    def load(self, sample_id: Hashable, variant: int, *, empty_caption: bool = False) -> dict[str, Any]:
        """{"latents": (C, f, h, w), each condition key as stored, PADDING: how to pad them} of one
        variant, such as a prompt_embeds (tokens, D) trimmed to the caption's tokens (the collate pads
        it back to the length the encoder gave) and a fixed-size prompt_mask.
        """
        sample = self.samples[sample_id]  # type: ignore[index]
        latent_key = sample.latent_keys[variant]
        latents = self.latents.get(latent_key)
        if latents is None:
            raise MissingCacheEntry(f"sample {sample_id!r}: latents {latent_key} (variant {variant}) are not in {self.latents.root}")
        key = self.empty_text_key if empty_caption and self.empty_text_key is not None else sample.text_key_of(variant)
        text = self._text_entry(key)
        if text is None:
            raise MissingCacheEntry(f"sample {sample_id!r}: text embeddings {key} are not in {self.text.root}")
        tensors, padding = text
        return {**latents, **tensors, PADDING: padding}


def step_seed(seed: int, step: int, stream: str = "frame-dropout") -> int:
    """A seed for (run seed, step), stable across processes and platforms."""
    digest = hashlib.sha256(f"{stream}:{int(seed)}:{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def caption_dropped(probability: float, seed: int, step: int, sample_id: Hashable, use: int) -> bool:
    """Whether this use of a sample trains on the empty caption: a draw from a generator seeded by
    (seed, step, sample, use), so it is the same with any number of workers or processes and after
    a resume. Probability 0 draws nothing."""
    if probability <= 0:
        return False
    if probability >= 1:
        return True
    generator = torch.Generator().manual_seed(step_seed(seed, step, f"caption-dropout:{sample_id}:{use}"))
    return bool(torch.rand(1, generator=generator).item() < probability)


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
        in_worker = get_worker_info() is not None
        conditions, pad = collate_conditions(samples, in_worker)
        batch = {
            "latents": latents,
            **conditions,
            "variants": torch.tensor([s["variant"] for s in samples], dtype=torch.long),
            # Per sample: trained on the empty caption (caption_dropout), and its dataset's loss_weight.
            "caption_dropped": torch.tensor([bool(s.get("caption_dropped", False)) for s in samples], dtype=torch.bool),
            "loss_weights": torch.tensor([float(s.get("loss_weight", 1.0)) for s in samples], dtype=torch.float32),
            "sample_ids": [s["sample_id"] for s in samples],
            "step": step,
        }
        return PackedBatch(batch, pad=pad) if in_worker else batch


def _padding(sample: Mapping[str, Any]) -> dict[str, StoredCondition]:
    padding = sample.get(PADDING)
    if padding is None:  # an item made by hand: one encoder's embeddings and mask, as entries were
        return stored_conditions({k: sample[k] for k in ("prompt_embeds", "prompt_mask")}, {})
    return padding


def _stack_padded(tensors: list[torch.Tensor], axis: int, width: int, value: float | bool, name: str) -> torch.Tensor:
    """(B, ...) of per-sample tensors, each padded with value to width along its axis."""
    first = tensors[0]
    others = [tuple(t.shape[:axis] + t.shape[axis + 1:]) for t in tensors]
    if len(set(others)) != 1:
        raise ValueError(f"condition {name}: the samples' shapes differ off its pad axis {axis}: {sorted(set(others))}")
    shape = list(first.shape)
    shape[axis] = width
    out = torch.full((len(tensors), *shape), value, dtype=first.dtype)
    for row, tensor in enumerate(tensors):
        out[row].narrow(axis, 0, tensor.shape[axis]).copy_(tensor)
    return out


def collate_conditions(samples: list[dict[str, Any]], in_worker: bool) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int, Any]]]:
    """Each condition key of the samples batched: a fixed-size one stacked, a padded one padded on its
    own axis with its own value to the longest length its encoder gave. In a worker a padded key is
    padded only to the batch's longest stored one: the rest up to the full length is added after
    the trip to the training process (the returned pad: key -> (batch dim, length, value)), so it
    does not travel."""
    padding = _padding(samples[0])
    for sample in samples[1:]:
        if set(_padding(sample)) != set(padding):
            raise ValueError(f"a batch's captions hold different conditions: {sorted(padding)} and {sorted(_padding(sample))}")
    out: dict[str, torch.Tensor] = {}
    pad: dict[str, tuple[int, int, Any]] = {}
    for name in sorted(padding):
        spec = padding[name][0]
        tensors = [s[name] for s in samples]
        if spec.pad_axis is None:
            out[name] = torch.stack(tensors)
            continue
        axis = spec.pad_axis
        full = max(int(_padding(s)[name][1]) for s in samples)
        width = max(t.shape[axis] for t in tensors) if in_worker else full
        out[name] = _stack_padded(tensors, axis, width, spec.pad_value, name)
        if width < full:
            pad[name] = (axis + 1, full, spec.pad_value)
    return out, pad


class PackedBatch:
    """A batch's tensors in one buffer, for the trip from a worker process to the training loop.

    Sent as it is, each tensor would cross through shared memory with its own file-descriptor
    handshake with the worker (about a millisecond each, measured: more than reading the batch from
    the cache). One buffer costs one handshake; a small one (under BY_VALUE_LIMIT) is copied through
    the pipe instead, which is faster still. The loader unpacks it into views of the buffer.
    """

    ALIGN = 64  # every tensor starts at a multiple of this, so each view is well aligned
    BY_VALUE_LIMIT = 2 * 1024 * 1024

    def __init__(self, batch: dict[str, Any], pad: dict[str, tuple[int, int, Any]] | None = None) -> None:
        """pad: tensors to pad on unpacking, name -> (dim, length, value)."""
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
    def _rebuild(buffer: Any, layout: list, rest: dict[str, Any], pad: dict[str, tuple[int, int, Any]]) -> PackedBatch:
        packed = PackedBatch.__new__(PackedBatch)
        packed.buffer = buffer if isinstance(buffer, torch.Tensor) else torch.from_numpy(buffer)
        packed.layout, packed.rest, packed.pad = layout, rest, pad
        return packed

    def pin_memory(self) -> PackedBatch:
        self.buffer = self.buffer.pin_memory()  # one pinned buffer for the whole batch
        return self

    def unpack(self) -> dict[str, Any]:
        out = {name: self.buffer[o : o + n].view(dtype).view(shape) for name, dtype, shape, o, n in self.layout}
        for name, (dim, length, value) in self.pad.items():
            t = out[name]
            shape = list(t.shape)
            shape[dim] = length
            full = torch.full(shape, value, dtype=t.dtype, pin_memory=self.buffer.is_pinned())
            full.narrow(dim, 0, t.shape[dim]).copy_(t)
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
