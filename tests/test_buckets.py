"""Bucket sizes, bucket choice and the batch sampler's promises (property tests)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import defaults
from core.data.buckets import (
    Bucket,
    BucketBatchSampler,
    assign_bucket,
    bucket_sizes,
    steps_per_epoch,
    total_batches,
    video_batch_size,
)

BUCKETS = [Bucket(9, 48, 80), Bucket(9, 80, 48), Bucket(5, 64, 64), Bucket(1, 64, 64), Bucket(1, 48, 80)]


@st.composite
def records(draw: st.DrawFn) -> list[tuple[str, Bucket, int, bool]]:
    n = draw(st.integers(1, 12))
    out = []
    for i in range(n):
        bucket = draw(st.sampled_from(BUCKETS))
        # Images are one-frame samples; a one-frame video can share a frames=1 bucket with them.
        is_video = bucket.frames > 1 or draw(st.booleans())
        out.append((f"item{i}", bucket, draw(st.integers(1, 3)), is_video))
    return out


sampler_args = {
    "recs": records(),
    "batch_size": st.integers(1, 4),
    "multiplier": st.sampled_from([0.05, 0.25, 0.5, 1.0]),
    "seed": st.integers(0, 2**31 - 1),
}


@pytest.mark.parametrize("resolution,divisor", [(64, 16), (512, 16), (384, 32), (500, 16), (720, 8), (64, 64)])
def test_bucket_sizes_keep_area_divisor_and_aspect_range(resolution: int, divisor: int) -> None:
    sizes = bucket_sizes(resolution, divisor)
    assert sizes
    for h, w in sizes:
        assert h % divisor == 0 and w % divisor == 0
        assert 1 / 4 - 1e-9 <= w / h <= 4 + 1e-9
        if divisor * 4 <= resolution:  # fine enough steps: the area stays close to resolution²
            assert 0.6 < h * w / resolution**2 < 1.5, (h, w)
    assert sorted((w, h) for h, w in sizes) == sorted(sizes)  # portrait mirrors landscape


def test_assign_bucket_follows_the_aspect_ratio() -> None:
    assert assign_bucket(160, 96, 9, 64, 16) == Bucket(9, 48, 80)
    assert assign_bucket(96, 160, 9, 64, 16) == Bucket(9, 80, 48)
    assert assign_bucket(128, 128, 1, 64, 16) == Bucket(1, 64, 64)
    square = assign_bucket(1920, 1920, 17, 512, 16)
    assert (square.height, square.width) == (512, 512)
    wide = assign_bucket(1920, 1080, 17, 512, 16)
    assert wide.width > wide.height and abs(math.log(wide.width / wide.height) - math.log(16 / 9)) < 0.05
    extreme = assign_bucket(4000, 100, 1, 512, 16)  # 40:1 goes to the widest bucket there is
    assert extreme.width / extreme.height == max(w / h for h, w in bucket_sizes(512, 16))


def test_video_batch_size() -> None:
    assert video_batch_size(1, 0.5) == 1
    assert video_batch_size(4, 0.5) == 2
    assert video_batch_size(5, 0.5) == 3  # half up
    assert video_batch_size(8, 0.05) == 1
    assert video_batch_size(3, 1.0) == 3


@settings(max_examples=60, deadline=None)
@given(**sampler_args)
def test_each_pass_draws_every_item_repeat_once_in_single_bucket_batches(recs, batch_size, multiplier, seed) -> None:
    per_pass = steps_per_epoch(recs, batch_size, multiplier)
    sampler = BucketBatchSampler(recs, batch_size, multiplier, seed, steps=per_pass * 3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == per_pass * 3
    by_id = {r[0]: r for r in recs}
    video_bs = video_batch_size(batch_size, multiplier)
    for p in range(3):
        in_pass = [b for b in batches if b.pass_index == p]
        assert len(in_pass) == per_pass
        drawn = Counter(s for b in in_pass for s in b.sample_ids)
        assert drawn == Counter({r[0]: r[2] for r in recs})
        for b in in_pass:
            assert {by_id[s][1] for s in b.sample_ids} == {b.bucket}
            assert {by_id[s][3] for s in b.sample_ids} == {b.is_video}
            limit = video_bs if b.is_video else batch_size
            assert 1 <= len(b.samples) <= limit
        # Only a bucket's last batch of the pass may be short.
        for key in {(b.bucket, b.is_video) for b in in_pass}:
            sizes = sorted(len(b.samples) for b in in_pass if (b.bucket, b.is_video) == key)
            limit = video_bs if key[1] else batch_size
            assert all(s == limit for s in sizes[1:])
    # Each (item, repeat) gets its own use number, counting up over the passes.
    uses = Counter((s, u) for b in batches for s, u in b.samples)
    assert all(n == 1 for n in uses.values())
    for sid, r in by_id.items():
        assert sorted(u for (s, u) in uses if s == sid) == list(range(3 * r[2]))
    assert [b.step for b in batches] == list(range(len(batches)))


@settings(max_examples=60, deadline=None)
@given(**sampler_args, steps=st.integers(1, 40), data=st.data())
def test_resuming_at_step_k_gives_the_tail_of_the_full_sequence(recs, batch_size, multiplier, seed, steps, data) -> None:
    full = list(BucketBatchSampler(recs, batch_size, multiplier, seed, steps))
    k = data.draw(st.integers(0, steps))
    resumed = list(BucketBatchSampler(recs, batch_size, multiplier, seed, steps, start_step=k))
    assert resumed == full[k:]
    assert len(full) == steps


def test_different_seeds_give_different_orders() -> None:
    recs = [(f"clip{i}", BUCKETS[i % 3], 1, True) for i in range(30)]
    orders = {tuple(s for b in BucketBatchSampler(recs, 1, 1.0, seed, 30) for s in b.sample_ids) for seed in range(5)}
    assert len(orders) == 5
    # and the same seed the same order, pass after pass differently
    a = [b.sample_ids for b in BucketBatchSampler(recs, 1, 1.0, 7, 60)]
    assert a == [b.sample_ids for b in BucketBatchSampler(recs, 1, 1.0, 7, 60)]
    assert a[:30] != a[30:]


def test_sampler_refuses_nothing_to_draw_and_bad_start() -> None:
    with pytest.raises(ValueError):
        BucketBatchSampler([], 1, 1.0, 0, 5)
    with pytest.raises(ValueError):
        BucketBatchSampler([("a", BUCKETS[0], 1, True)], 1, 1.0, 0, 5, start_step=6)
    assert list(BucketBatchSampler([], 1, 1.0, 0, 0)) == []


def test_steps_per_epoch_and_run_length() -> None:
    recs = [("v1", BUCKETS[0], 2, True), ("v2", BUCKETS[0], 1, True), ("v3", BUCKETS[1], 1, True), ("i1", BUCKETS[3], 3, False)]
    # videos at batch 2 (4 * 0.5): bucket 0 has 3 draws -> 2 batches, bucket 1 -> 1; images at 4: 3 draws -> 1
    assert steps_per_epoch(recs, 4, 0.5) == 4
    config = defaults()
    config.update(batch_size=4, gradient_accumulation_steps=3, max_steps=10)
    config["video_config"]["video_batch_size_multiplier"] = 0.5
    assert total_batches(config, recs) == 30
    config.update(stop_after="EPOCHS", epochs=2)
    assert total_batches(config, recs) == 9  # 8 batches, rounded up to whole optimizer steps of 3
