"""The latent and text caches: round trips, atomic writes, damaged entries, keys, content hashes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from core.data import cache as cache_module
from core.data.cache import (
    CACHE_FORMAT_VERSION,
    ContentHasher,
    LatentCache,
    TextCache,
    expand_text,
    latent_key,
    seed_from_key,
    text_key,
)

BASE = dict(
    content_hash="a" * 64,
    vae_identity="wan-vae:123",
    bucket=(9, 64, 64),
    times=[0.0, 1 / 24, 2 / 24],
    reversed=False,
    rotation=0,
)


def _key(**changes: object) -> str:
    args = {**BASE, **changes}
    return latent_key(
        args.pop("content_hash"), args.pop("vae_identity"), args.pop("bucket"), args.pop("times"),
        args.pop("reversed"), args.pop("rotation"), **args,
    )  # fmt: skip


def test_round_trip(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path)
    key = _key()
    latents = torch.randn(16, 3, 8, 8)
    assert not cache.has(key) and cache.get(key) is None
    path = cache.put(key, {"latents": latents}, {"source": "clip.mp4", "times": [0.0, 0.5]})
    assert path == tmp_path / "latents" / f"{key}.safetensors"
    assert cache.has(key)
    tensors, metadata = cache.get_with_metadata(key)
    assert torch.equal(tensors["latents"], latents)
    assert metadata["source"] == "clip.mp4" and json.loads(metadata["times"]) == [0.0, 0.5]
    assert metadata["key"] == key and metadata["format"] == str(CACHE_FORMAT_VERSION)


def test_a_view_into_a_batch_is_stored_alone(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path)
    batch = torch.randn(4, 16, 3, 8, 8)
    cache.put(_key(), {"latents": batch[1]})
    assert torch.equal(cache.get(_key())["latents"], batch[1])
    assert cache.path_for(_key()).stat().st_size < batch.numel() * 4 / 2


def test_text_entries_are_trimmed_on_disk_and_padded_on_load(tmp_path: Path) -> None:
    cache = TextCache(tmp_path)
    key = text_key("a cat", "wan-text:1", 512)
    embeds = torch.zeros(512, 32)
    embeds[:7] = torch.randn(7, 32)
    mask = torch.arange(512) < 7
    cache.put_text(key, embeds, mask)
    assert cache.get(key)["prompt_embeds"].shape == (7, 32)
    out = cache.get_text(key)
    assert torch.equal(out["prompt_embeds"], embeds) and torch.equal(out["prompt_mask"], mask)
    assert torch.equal(expand_text(cache.get(key))["prompt_embeds"], embeds)


def test_a_put_interrupted_before_the_rename_leaves_nothing_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = LatentCache(tmp_path)
    key = _key()

    def crash(*args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        cache.put(key, {"latents": torch.randn(16, 3, 8, 8)})
    monkeypatch.undo()
    assert not cache.has(key) and cache.get(key) is None
    assert list(cache.root.iterdir()) == []  # the temporary file is gone too


@pytest.mark.parametrize("cut", [1, 100, 10_000])
def test_a_truncated_entry_reads_as_missing(tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture) -> None:
    cache = LatentCache(tmp_path)
    key = _key()
    path = cache.put(key, {"latents": torch.randn(16, 3, 8, 8)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    assert not cache.has(key)
    with caplog.at_level(logging.WARNING, logger="core.data.cache"):
        assert cache.get(key) is None
    assert "damaged" in caplog.text and path.name in caplog.text
    cache.put(key, {"latents": torch.ones(2)})  # a new put repairs it
    assert cache.has(key) and torch.equal(cache.get(key)["latents"], torch.ones(2))


def test_garbage_and_misplaced_entries_read_as_missing(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path)
    key, other = _key(), _key(rotation=90)
    cache.root.mkdir(parents=True)
    cache.path_for(key).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert not cache.has(key) and cache.get(key) is None
    cache.put(other, {"latents": torch.ones(2)})
    os.replace(cache.path_for(other), cache.path_for(key))  # a file under another entry's name
    assert not cache.has(key) and cache.get(key) is None
    with pytest.raises(ValueError):
        cache.path_for("../../etc/passwd")


def test_latent_key_changes_with_content_each_setting_and_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    key = _key()
    assert key == _key() and len(key) == 64
    changed = [
        _key(content_hash="b" * 64),
        _key(vae_identity="wan-vae:456"),
        _key(bucket=(9, 64, 96)),
        _key(bucket=(5, 64, 64)),
        _key(times=[0.5, 0.5 + 1 / 24, 0.5 + 2 / 24]),
        _key(reversed=True),
        _key(rotation=90),
        _key(crop_start=0.25),
        _key(vae_dtype="bfloat16"),
    ]
    assert len({key, *changed}) == len(changed) + 1
    # Arithmetic noise in a timestamp is not a new sample.
    assert _key(times=[0.0, 1 / 24 + 1e-12, 2 / 24]) == key
    # The format version is part of every key.
    text = text_key("a", "t", 512)
    monkeypatch.setattr(cache_module, "CACHE_FORMAT_VERSION", CACHE_FORMAT_VERSION + 1)
    assert _key() != key and text_key("a", "t", 512) != text


def test_text_key_changes_with_caption_encoder_and_length() -> None:
    key = text_key("a cat", "wan-text:1", 512)
    assert key == text_key("a cat", "wan-text:1", 512)
    others = {text_key("a dog", "wan-text:1", 512), text_key("a cat", "wan-text:2", 512), text_key("a cat", "wan-text:1", 226)}
    assert key not in others and len(others) == 3
    assert 0 <= seed_from_key(key) < 2**63


def test_content_hasher_memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"video bytes" * 1000)
    expected = hashlib.sha256(clip.read_bytes()).hexdigest()
    with ContentHasher(tmp_path / "cache") as hasher:
        assert hasher.hash(clip) == expected
    memo = json.loads((tmp_path / "cache" / "file-hashes.json").read_text())
    assert memo["files"][str(clip.absolute())][2] == expected

    # A warm run reads the memo instead of the file.
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: reads.append(p) or real_open(p, *a, **k))
    assert ContentHasher(tmp_path / "cache").hash(clip) == expected
    assert reads == []
    monkeypatch.undo()

    # Touched but identical: hashed again (its mtime changed), same hash.
    st = clip.stat()
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    hasher = ContentHasher(tmp_path / "cache")
    assert hasher.hash(clip) == expected
    hasher.save()
    assert json.loads((tmp_path / "cache" / "file-hashes.json").read_text())["files"][str(clip.absolute())][1] == st.st_mtime_ns + 5_000_000_000

    # Changed: a new hash.
    clip.write_bytes(b"other bytes" * 1000)
    assert ContentHasher(tmp_path / "cache").hash(clip) == hashlib.sha256(b"other bytes" * 1000).hexdigest()


def test_content_hasher_survives_a_damaged_memo(tmp_path: Path) -> None:
    (tmp_path / "file-hashes.json").write_text("{broken")
    clip = tmp_path / "a.png"
    clip.write_bytes(b"png")
    hasher = ContentHasher(tmp_path)
    assert hasher.hash(clip) == hashlib.sha256(b"png").hexdigest()
    hasher.save()
    assert json.loads((tmp_path / "file-hashes.json").read_text())["version"] == 1
