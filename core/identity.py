"""Stable identities of files and folders: what the caches key on, so an entry changes when, and only
when, the files it was made from change (the text and latent caches, the quantization cache).

Plain file hashing, with no torch and nothing of the model families, so every layer can use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

# Files at or below this size are hashed in full. Above it, only (size, first MiB, last MiB): a
# text encoder's weights are 10+ GB and hashing them in full at every start would cost minutes of
# disk reads. A safetensors file starts with a header naming every tensor with its dtype, shape
# and offsets, so any re-export, re-quantisation, truncation or different checkpoint changes the
# head, the tail or the size; only a same-size edit of the middle bytes would go unnoticed.
FULL_HASH_LIMIT = 64 * 1024 * 1024
PARTIAL_HASH_SPAN = 1024 * 1024

# Per process: (absolute path, size, mtime_ns) -> digest. Identities are asked for many times.
_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes (a partial hash above FULL_HASH_LIMIT), memoised per process."""
    p = Path(path).absolute()
    st = p.stat()
    memo_key = (str(p), st.st_size, st.st_mtime_ns)
    with _DIGESTS_LOCK:
        cached = _DIGESTS.get(memo_key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(p, "rb") as handle:
        if st.st_size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: handle.read(1024 * 1024), b""):
                h.update(chunk)
        else:
            h.update(f"partial:{st.st_size}:".encode())
            h.update(handle.read(PARTIAL_HASH_SPAN))
            handle.seek(st.st_size - PARTIAL_HASH_SPAN)
            h.update(handle.read(PARTIAL_HASH_SPAN))
    digest = h.hexdigest()
    with _DIGESTS_LOCK:
        _DIGESTS[memo_key] = digest
    return digest


def folder_identity(label: str, *folders: Path, extra: dict[str, Any] | None = None) -> str:
    """A stable string for the files of some component folders: their names, sizes and digests.

    config.json is hashed by its parsed content (so key order and whitespace do not count); every
    other non-hidden file (weights, shard index, tokenizer files) by its bytes.
    """
    h = hashlib.sha256()
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing")
        h.update(f"folder:{folder.name}\n".encode())
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = file.relative_to(folder).as_posix()
            if any(part.startswith(".") for part in rel.split("/")):
                continue  # editor, OS and download-lock files say nothing about the model
            if rel == "config.json":
                config = json.loads(file.read_text(encoding="utf-8"))
                config.pop("_diffusers_version", None)  # the saving library's version changes no weight
                config.pop("transformers_version", None)
                h.update(b"config:" + json.dumps(config, sort_keys=True).encode() + b"\n")
            else:
                h.update(f"file:{rel}:{file.stat().st_size}:{file_digest(file)}\n".encode())
    if extra:
        h.update(b"extra:" + json.dumps(extra, sort_keys=True).encode())
    return f"{label}:{h.hexdigest()}"
