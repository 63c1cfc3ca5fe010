"""The cached-sample dataset and its loader: variants per use, shapes, and the same batches with any workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.data.buckets import BucketBatchSampler
from core.data.cache import LatentCache, TextCache, latent_key, text_key
from core.data.dataset import CachedSample, CachedSampleDataset, MissingCacheEntry, collate_batch, make_loader

BUCKETS = [((9, 64, 64), (16, 3, 8, 8)), ((5, 64, 96), (16, 2, 8, 12))]
VARIANTS = 2


def _fill_cache(cache_dir: Path, count: int = 10) -> dict[str, CachedSample]:
    latents, texts = LatentCache(cache_dir), TextCache(cache_dir)
    samples = {}
    for i in range(count):
        bucket, shape = BUCKETS[i % 2]
        keys = []
        for v in range(VARIANTS):
            key = latent_key(f"{i:064x}", "wan-vae:test", bucket, [0.1 * v], False, 0)
            # Latents carry (sample, variant) in their values so a batch can be read back.
            latents.put(key, {"latents": torch.full(shape, float(i * 10 + v)) + torch.randn(shape) * 0.01})
            keys.append(key)
        caption = f"caption {i}"
        tkey = text_key(caption, "wan-text:test", 512)
        mask = torch.arange(512) < (3 + i)
        texts.put_text(tkey, torch.randn(512, 32) * mask[:, None], mask)
        samples[f"clip-{i}"] = CachedSample(tuple(keys), tkey)
    return samples


@pytest.fixture
def dataset(tmp_path: Path) -> CachedSampleDataset:
    return CachedSampleDataset(_fill_cache(tmp_path / "cache"), tmp_path / "cache")


def _sampler(dataset: CachedSampleDataset, steps: int = 12, start_step: int = 0) -> BucketBatchSampler:
    records = [(sid, BUCKETS[int(sid.split("-")[1]) % 2][0], 2, True) for sid in dataset.samples]
    return BucketBatchSampler(records, batch_size=4, video_batch_size_multiplier=0.5, seed=3, steps=steps, start_step=start_step)


def test_items_take_variant_use_mod_count(dataset: CachedSampleDataset) -> None:
    for use in range(4):
        item = dataset[("clip-3", use, 0)]
        assert item["variant"] == use % VARIANTS
        assert item["latents"].shape == (16, 2, 8, 12)
        assert abs(item["latents"].mean().item() - (30 + use % VARIANTS)) < 0.1
        # Text as stored: the caption's 6 tokens; the collate pads to the mask's 512.
        assert item["prompt_embeds"].shape == (6, 32) and item["prompt_mask"].shape == (512,)
        assert item["prompt_mask"].sum() == 6


def test_collate_stacks_one_bucket(dataset: CachedSampleDataset) -> None:
    batch = collate_batch([dataset[("clip-0", 0, 5)], dataset[("clip-2", 1, 5)]])
    assert batch["latents"].shape == (2, 16, 3, 8, 8)
    assert batch["prompt_embeds"].shape == (2, 512, 32) and batch["prompt_mask"].shape == (2, 512)
    assert batch["variants"].tolist() == [0, 1] and batch["sample_ids"] == ["clip-0", "clip-2"] and batch["step"] == 5
    for row, tokens in enumerate((3, 5)):
        assert batch["prompt_mask"][row].sum() == tokens and (batch["prompt_embeds"][row, tokens:] == 0).all()
        assert (batch["prompt_embeds"][row, :tokens] != 0).all()
    with pytest.raises(ValueError, match="one bucket"):
        collate_batch([dataset[("clip-0", 0, 0)], dataset[("clip-1", 0, 0)]])


def _run(dataset: CachedSampleDataset, workers: int, **kwargs: object) -> list[dict]:
    loader = make_loader(dataset, _sampler(dataset), workers, pin_memory=True, seed=11, **kwargs)
    return list(loader)


def test_loader_gives_the_same_batches_with_and_without_workers(dataset: CachedSampleDataset) -> None:
    serial = _run(dataset, 0, frame_dropout_probability=0.3)
    parallel = _run(dataset, 2, frame_dropout_probability=0.3)
    assert len(serial) == len(parallel) == 12
    for a, b in zip(serial, parallel):
        assert a["step"] == b["step"] and a["sample_ids"] == b["sample_ids"]
        for name in ("latents", "prompt_embeds", "prompt_mask", "variants"):
            assert torch.equal(a[name], b[name])
    assert [b["step"] for b in serial] == list(range(12))
    for batch in serial:
        b, c, f, h, w = batch["latents"].shape
        assert (b, c) == (2, 16) and (f, h, w) in {(3, 8, 8), (2, 8, 12)}  # video batches: 4 * 0.5
        assert batch["prompt_embeds"].shape == (b, 512, 32)


def test_frame_dropout_depends_on_seed_and_step_only(dataset: CachedSampleDataset) -> None:
    plain = _run(dataset, 0)
    dropped = _run(dataset, 0, frame_dropout_probability=1.0)
    for a, b in zip(plain, dropped):
        first = a["latents"][:, :, :1]
        assert torch.equal(b["latents"], first.expand_as(a["latents"]))
    # Resuming at step 6 gives the same batches as the uninterrupted run from there.
    resumed = list(make_loader(dataset, _sampler(dataset, start_step=6), 0, False, seed=11, frame_dropout_probability=0.3))
    full = _run(dataset, 0, frame_dropout_probability=0.3)
    for a, b in zip(full[6:], resumed):
        assert a["step"] == b["step"] and torch.equal(a["latents"], b["latents"])


def test_plain_lists_of_pairs_are_numbered_from_start_step(dataset: CachedSampleDataset) -> None:
    batches = [[("clip-0", 0), ("clip-2", 3)], [("clip-1", 1)]]
    out = list(make_loader(dataset, batches, 0, False, start_step=40))
    assert [b["step"] for b in out] == [40, 41]
    assert out[0]["variants"].tolist() == [0, 1] and out[0]["latents"].shape == (2, 16, 3, 8, 8)
    listed = CachedSampleDataset(list(dataset.samples.values()), dataset.latents.cache_dir)
    assert list(make_loader(listed, [[(0, 0), (2, 1)]], 0, False))[0]["sample_ids"] == [0, 2]


def test_a_missing_entry_is_an_error_naming_the_sample(dataset: CachedSampleDataset) -> None:
    sample = dataset.samples["clip-4"]
    dataset.latents.path_for(sample.latent_keys[1]).unlink()
    dataset[("clip-4", 0, 0)]
    with pytest.raises(MissingCacheEntry, match="clip-4.*variant 1"):
        dataset[("clip-4", 1, 0)]


@pytest.mark.parametrize("limit", [0, 2**21])
def test_packed_batches_survive_the_trip_between_processes(dataset: CachedSampleDataset, limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from multiprocessing.reduction import ForkingPickler

    from core.data import dataset as dataset_module

    monkeypatch.setattr(dataset_module.PackedBatch, "BY_VALUE_LIMIT", limit)  # 0: through shared memory
    monkeypatch.setattr(dataset_module, "get_worker_info", lambda: object())  # collate as in a worker
    collate = dataset_module.BatchCollator(seed=1, frame_dropout_probability=0.2)
    items = [dataset[("clip-0", 0, 7)], dataset[("clip-2", 1, 7)], dataset[("clip-4", 0, 7)]]
    packed = collate(items)
    assert isinstance(packed, dataset_module.PackedBatch)
    assert packed.buffer.is_shared() == (limit == 0)
    batch = ForkingPickler.loads(ForkingPickler.dumps(packed)).unpack()
    monkeypatch.setattr(dataset_module, "get_worker_info", lambda: None)
    expected = collate(items)
    assert batch.keys() == expected.keys()
    for name in ("latents", "prompt_embeds", "prompt_mask", "variants"):
        assert batch[name].dtype == expected[name].dtype and torch.equal(batch[name], expected[name])
    assert batch["sample_ids"] == expected["sample_ids"] and batch["step"] == 7
