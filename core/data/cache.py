"""On-disk caches of VAE latents and text embeddings, keyed by content and settings.

Layout under cache_dir (docs/data-pipeline.md, "Caches"):
    latents/<key>.safetensors   one sample variant's latents
    text/<key>.safetensors      one caption's conditions (each trimmed of its padding) and how to pad them
    file-hashes.json            content hashes of media files, by (path, size, mtime_ns)

Every entry is written to a temporary name, fsynced and renamed (core.atomic), so an entry that
exists is complete. One that is damaged anyway (a disk error, a copy cut short) reads as missing
and is logged, never used. A key is a sha256 of everything that produced the entry plus
CACHE_FORMAT_VERSION, so a change anywhere gives a new key and stale entries are simply not read.

torch and safetensors are imported on first use: keys and content hashes need neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.atomic import explained_write_errors, write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    import torch

    from core.models.conditions import ConditionSpec

# A stored condition's padding: the adapter's spec, and the length along its pad axis that the
# encoder gave (None for a fixed-size key). The collate pads the trimmed tensor back to it.
StoredCondition = tuple["ConditionSpec", "int | None"]

logger = logging.getLogger(__name__)

# Bump when what an entry holds or how frames become latents changes (decoding, resizing, the
# posterior sampling, the text trimming): every key changes with it.
CACHE_FORMAT_VERSION = 1

_KEY_RE = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 4 * 1024 * 1024


def _digest(payload: dict[str, Any]) -> str:
    text = json.dumps({"format": CACHE_FORMAT_VERSION, **payload}, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def latent_key(
    content_hash: str,
    vae_identity: str,
    bucket: Sequence[int],
    times: Sequence[float],
    reversed: bool,
    rotation: int,
    **variant_info: Any,
) -> str:
    """The key of one sample variant's latents.

    bucket is (frames, height, width) in pixels; times are the frame timestamps in seconds, in
    the order decoded (before any reversal); variant_info holds anything else that changes the
    latents (the temporal augmentation's parameters, the VAE's dtype, tiling...), JSON-able values.
    The variant's index is not needed: two variants with the same frames are the same entry.
    """
    return _digest(
        {
            "kind": "latents",
            "content": content_hash,
            "vae": vae_identity,
            "bucket": [int(v) for v in bucket],
            # Rounded to the microsecond: float noise from arithmetic must not make a new key.
            "times": [f"{float(t):.6f}" for t in times],
            "reversed": bool(reversed),
            "rotation": int(rotation) % 360,
            "variant": {k: variant_info[k] for k in sorted(variant_info)},
        }
    )


def text_key(caption: str, text_identity: str, max_length: int, dtype: str = "float32") -> str:
    """The key of one caption's embeddings; dtype is the precision the text encoder computed in."""
    return _digest({"kind": "text", "caption": caption, "text": text_identity, "max_length": int(max_length), "dtype": dtype})


def seed_from_key(key: str) -> int:
    """A generator seed derived from a cache key, so the VAE posterior sample of an entry is reproducible."""
    return int(key[:15], 16)


class ContentHasher:
    """sha256 of files' bytes, memoised in cache_dir/file-hashes.json by (path, size, mtime_ns).

    A file whose size or modification time changed is hashed again (a touched but identical file
    gets the same hash back). Thread-safe. Call save() (or use it as a context manager) to keep
    new hashes for the next run; it also saves by itself every `save_every` new hashes.
    """

    FILE_NAME = "file-hashes.json"

    def __init__(self, cache_dir: str | os.PathLike, save_every: int = 256) -> None:
        self.path = Path(cache_dir).expanduser() / self.FILE_NAME
        self.save_every = save_every
        self._lock = threading.Lock()
        self._entries: dict[str, list[Any]] = self._load()
        self._unsaved = 0

    def _load(self) -> dict[str, list[Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            files = data["files"]
            if data.get("version") != 1 or not isinstance(files, dict):
                raise ValueError("unknown format")
            return {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 3}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            logger.warning("ignoring unreadable content-hash memo %s (%s); files will be hashed again", self.path, exc)
            return {}

    def hash(self, path: str | os.PathLike) -> str:
        """The sha256 hex digest of the file's content."""
        p = Path(path).absolute()
        st = p.stat()
        name = str(p)
        with self._lock:
            entry = self._entries.get(name)
        if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return str(entry[2])
        h = hashlib.sha256()
        with open(p, "rb") as handle:
            for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._entries[name] = [st.st_size, st.st_mtime_ns, digest]
            self._unsaved += 1
            due = self._unsaved >= self.save_every
        if due:
            self.save()
        return digest

    def save(self) -> None:
        """Write the memo atomically, merged with what other processes saved meanwhile."""
        with self._lock:
            if not self._unsaved and self.path.exists():
                return
            merged = self._load()
            merged.update(self._entries)
            self._entries = merged
            with explained_write_errors(self.path, "the file-hash memo of the cache", key="cache_dir"):
                write_json_atomic(self.path, {"version": 1, "files": merged})
            self._unsaved = 0

    def __enter__(self) -> ContentHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.save()


def _read_file(path: str) -> bytes:
    """A whole file in one read: fewer system calls than open().read(), which the loop feels."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size)
        while len(data) < size:  # a short read (large files, some filesystems): read on
            more = os.read(fd, size - len(data))
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)


def _header(head: bytes, size: int) -> dict[str, Any]:
    """The JSON header of a safetensors file from its first bytes, checked against the file's size."""
    if len(head) < 8:
        raise ValueError(f"{size} bytes, shorter than a safetensors header")
    (n,) = struct.unpack_from("<Q", head)
    if n > size - 8 or len(head) < 8 + n:
        raise ValueError("the header runs past the end of the file")
    header = json.loads(head[8 : 8 + n])
    end = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if end != size:
        raise ValueError(f"{size} bytes, expected {end}")
    return header


class EntryCache:
    """One namespace of safetensors entries (cache_dir/<namespace>/<key>.safetensors)."""

    namespace = "entries"

    def __init__(self, cache_dir: str | os.PathLike, namespace: str | None = None) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        if namespace is not None:
            self.namespace = namespace
        self.root = self.cache_dir / self.namespace
        self._root = str(self.root)  # os.path.join on strings: pathlib costs more than the read itself

    def _file(self, key: str) -> str:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"not a cache key: {key!r}")
        return os.path.join(self._root, key + ".safetensors")

    def path_for(self, key: str) -> Path:
        return Path(self._file(key))

    def has(self, key: str, names: Iterable[str] | None = None) -> bool:
        """Whether a complete entry exists (checked from its header and size, without loading it),
        holding at least the tensors `names` where given."""
        try:
            with open(self._file(key), "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                head = handle.read(8)
                if len(head) == 8:
                    head += handle.read(min(struct.unpack("<Q", head)[0], size))
            header = _header(head, size)
            return header.get("__metadata__", {}).get("key") == key and set(names or ()) <= set(header)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return False

    def _read(self, key: str, parse_metadata: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        from safetensors.torch import load

        path = self._file(key)
        try:
            data = _read_file(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("cache entry %s cannot be read (%s); treating it as missing", path, exc)
            return None
        try:
            metadata: dict[str, str] = {}
            if parse_metadata:
                metadata = _header(data, len(data)).get("__metadata__") or {}
                if metadata.get("key") != key:
                    raise ValueError("it belongs to another key")
            else:
                # The training loop's path: the key is checked in the header's bytes (safetensors
                # writes compact JSON) and load() checks that the data covers the header's offsets.
                (n,) = struct.unpack_from("<Q", data)
                if b'"key":"' + key.encode() + b'"' not in data[8 : 8 + n]:
                    raise ValueError("it belongs to another key")
            tensors = load(data)
        except Exception as exc:  # any failure to parse means the entry is not usable, never half-used
            logger.warning("cache entry %s is damaged (%s); treating it as missing", path, exc)
            return None
        return tensors, dict(metadata)

    def get_with_metadata(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """(tensors, metadata) of the entry, or None when it is missing or damaged."""
        return self._read(key, parse_metadata=True)

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None when it is missing or damaged."""
        found = self._read(key, parse_metadata=False)
        return None if found is None else found[0]

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> Path:
        """Write the entry atomically; metadata values that are not strings are stored as JSON."""
        from safetensors.torch import save

        meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
        meta.update(key=key, format=str(CACHE_FORMAT_VERSION))
        prepared = {}
        for name, tensor in tensors.items():
            t = tensor.detach().to("cpu").contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a view into a batch: store its own bytes, not the whole batch's
            prepared[name] = t
        path = self.path_for(key)
        with explained_write_errors(path, "the cache entry", key="cache_dir"):
            return write_bytes_atomic(path, save(prepared, metadata=meta))


class LatentCache(EntryCache):
    """cache_dir/latents: {"latents": (C, f, h, w)} per sample variant."""

    namespace = "latents"


class TextCache(EntryCache):
    """cache_dir/text: per caption, every condition key encode_text returns (core/models/conditions.py).

    Each key with a pad axis is stored trimmed of its trailing padding (most captions use a fraction
    of the 512 tokens), and the entry's "conditions" metadata holds, per key, the pad axis, the pad
    value and the length the encoder gave, so the collate restores exactly the tensor encode_text
    returned. Entries written before conditions were named (no "conditions" metadata: one encoder's
    prompt_embeds trimmed to its mask's tokens and the whole prompt_mask) are read as that layout.
    """

    namespace = "text"

    def put_conditions(self, key: str, tensors: Mapping[str, torch.Tensor], layout: Mapping[str, ConditionSpec]) -> Path:
        """Store one caption's conditions: its row of each key encode_text returned, padded as `layout` says."""
        from core.models.conditions import used_length

        if set(tensors) != set(layout):
            raise ValueError(f"conditions {sorted(tensors)} do not match the layout's keys {sorted(layout)}")
        stored, described = {}, {}
        for name, tensor in tensors.items():
            spec = layout[name]
            described[name] = spec.to_json()
            if spec.pad_axis is not None:
                axis = spec.pad_axis
                described[name]["length"] = int(tensor.shape[axis])
                tensor = tensor.narrow(axis, 0, used_length(tensor, axis, spec.pad_value))
            stored[name] = tensor
        return self.put(key, stored, {"conditions": described})

    def put_text(self, key: str, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor) -> Path:
        """Store one encoder's (L, D) embeddings and (L,) mask: the embeddings of the mask's tokens only."""
        from core.models.conditions import TEXT_LAYOUT

        count = int(prompt_mask.bool().sum())
        if not prompt_mask[:count].bool().all():
            raise ValueError("the mask must cover a prefix of the tokens (right padding) to store them trimmed")
        described = {name: spec.to_json() for name, spec in TEXT_LAYOUT.items()}
        described["prompt_embeds"]["length"] = int(prompt_embeds.shape[0])
        return self.put(key, {"prompt_embeds": prompt_embeds[:count], "prompt_mask": prompt_mask.bool()},
                        {"conditions": described})

    def get_trimmed(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, StoredCondition]] | None:
        """(tensors as stored, {key: (spec, length)}), or None when the entry is missing or damaged."""
        found = self.get_with_metadata(key)
        if found is None:
            return None
        tensors, metadata = found
        try:
            return tensors, stored_conditions(tensors, metadata)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("text cache entry %s has no usable condition layout (%s); treating it as missing", self.path_for(key), exc)
            return None

    def get_conditions(self, key: str) -> dict[str, torch.Tensor] | None:
        """One caption's conditions padded back to what encode_text returned, or None."""
        found = self.get_trimmed(key)
        if found is None:
            return None
        tensors, described = found
        return {name: padded_condition(tensors[name], *described[name]) for name in tensors}

    def get_text(self, key: str) -> dict[str, torch.Tensor] | None:
        return self.get_conditions(key)


def stored_conditions(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, StoredCondition]:
    """Each stored key's padding, from the entry's metadata (or the layout of entries written before it)."""
    from core.models.conditions import ConditionSpec

    if "conditions" not in metadata:  # one encoder's embeddings and mask, as every entry was
        if set(tensors) != {"prompt_embeds", "prompt_mask"}:
            raise ValueError(f"an entry without a layout must hold prompt_embeds and prompt_mask, not {sorted(tensors)}")
        return {"prompt_embeds": (ConditionSpec(0, 0.0), int(tensors["prompt_mask"].shape[0])),
                "prompt_mask": (ConditionSpec(None, False), None)}
    described = json.loads(metadata["conditions"])
    if set(described) != set(tensors):
        raise ValueError(f"the layout names {sorted(described)} but the entry holds {sorted(tensors)}")
    out: dict[str, StoredCondition] = {}
    for name, data in described.items():
        spec = ConditionSpec.from_json(data)
        out[name] = (spec, None if spec.pad_axis is None else int(data["length"]))
    return out


def padded_condition(tensor: torch.Tensor, spec: ConditionSpec, length: int | None) -> torch.Tensor:
    """A stored (trimmed) condition padded back to `length` along its pad axis."""
    from core.models.conditions import pad_axis_to

    return tensor if spec.pad_axis is None or length is None else pad_axis_to(tensor, spec.pad_axis, length, spec.pad_value)


def expand_text(entry: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An entry of one encoder's embeddings and mask (put_text's, or one written before conditions
    were named) -> {"prompt_embeds": (L, D) zero-padded, "prompt_mask": (L,) bool}."""
    import torch

    embeds, mask = entry["prompt_embeds"], entry["prompt_mask"]
    padded = torch.zeros((mask.shape[0], embeds.shape[1]), dtype=embeds.dtype)
    padded[: embeds.shape[0]] = embeds
    return {"prompt_embeds": padded, "prompt_mask": mask}
