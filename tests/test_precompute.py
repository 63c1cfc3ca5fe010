"""From a folder of clips to cached latents and text, end to end with the tiny Wan model: what is
computed, what is reused, what invalidates what, and what happens to files that fail."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from media_factory import make_clip, make_image

from core.config import resolve
from core.data import precompute
from core.data.buckets import BucketBatchSampler
from core.data.cache import ContentHasher, LatentCache
from core.data.dataset import CachedSampleDataset, make_loader
from core.data.media import UnusableMedia
from core.data.plan import plan_data
from core.data.precompute import fill_caches
from core.errors import UserError
from core.models.registry import adapter_for


@pytest.fixture(scope="module")
def tiny_wan(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("wan21")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "clips"
    folder.mkdir()
    make_clip(folder / "wide.mp4", width=96, height=64, fps=16, seconds=1.5)
    make_clip(folder / "tall.mp4", width=64, height=96, fps=16, seconds=1.5)
    make_image(folder / "still.png", width=80, height=80)
    for stem, caption in [("wide", "a wide clip"), ("tall", "a tall clip"), ("still", "a still image")]:
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    (folder / "broken.mp4").write_bytes(b"not a video at all" * 100)
    (folder / "broken.txt").write_text("broken", encoding="utf-8")
    return folder


def _config(tiny_wan: Path, dataset: Path, cache: Path, **overlay) -> dict:
    base = {
        "base_model": str(tiny_wan),
        "datasets": [{"path": str(dataset), "repeats": 1}],
        "cache_dir": str(cache),
        "resolution": 64,
        "frames": 9,
        "video_config": {"max_frames": 9, "target_fps": 16.0},
    }
    for key, value in overlay.items():
        base = {**base, **value} if key == "extra" else {**base, key: value}
    return resolve(base)


def _run(config: dict):
    adapter = adapter_for(config)
    plan = plan_data(config, adapter, ContentHasher(config["cache_dir"]))
    return plan, fill_caches(plan, adapter, config["cache_dir"])


def test_caches_fill_once_and_are_reused(tiny_wan: Path, dataset: Path, tmp_path: Path) -> None:
    config = _config(tiny_wan, dataset, tmp_path / "cache")
    plan, report = _run(config)
    assert len(plan.train) == 3
    assert any("broken.mp4" in str(issue) for issue in plan.issues)
    assert (report.latents_computed, report.texts_computed) == (3, 3)
    cache = LatentCache(config["cache_dir"])
    for sample in plan.train:
        latents = cache.get(sample.latent_keys[0])["latents"]
        frames, height, width = sample.bucket
        assert latents.shape == (16, (frames - 1) // 4 + 1, height // 8, width // 8)
        assert torch.isfinite(latents).all()
    again, report = _run(config)
    assert (report.latents_computed, report.texts_computed) == (0, 0)
    assert (report.latents_reused, report.texts_reused) == (3, 3)
    assert [s.latent_keys for s in again.train] == [s.latent_keys for s in plan.train]


def test_a_changed_file_or_caption_recomputes_only_that(tiny_wan: Path, dataset: Path, tmp_path: Path) -> None:
    config = _config(tiny_wan, dataset, tmp_path / "cache")
    _run(config)
    make_clip(dataset / "wide.mp4", width=96, height=64, fps=16, seconds=1.5, crf=30)  # new content
    (dataset / "tall.txt").write_text("a tall clip, captioned again", encoding="utf-8")
    _, report = _run(config)
    assert (report.latents_computed, report.latents_reused) == (1, 2)
    assert (report.texts_computed, report.texts_reused) == (1, 2)


def test_a_touched_but_identical_file_is_not_recomputed(tiny_wan: Path, dataset: Path, tmp_path: Path) -> None:
    config = _config(tiny_wan, dataset, tmp_path / "cache")
    _run(config)
    os.utime(dataset / "wide.mp4", ns=(1_000_000_000, 1_000_000_000))
    _, report = _run(config)
    assert report.latents_computed == 0


@pytest.mark.parametrize(
    ("overlay", "latents", "texts"),
    [
        ({"resolution": 96}, 3, 0),
        ({"extra": {"video_config": {"max_frames": 9, "target_fps": 8.0}}}, 2, 0),  # images do not change
        ({"extra": {"vae": {"weight_dtype": "BFLOAT_16"}}}, 3, 0),  # the VAE computes in another precision
    ],
)
def test_a_changed_setting_recomputes_what_it_affects(
    tiny_wan: Path, dataset: Path, tmp_path: Path, overlay: dict, latents: int, texts: int
) -> None:
    _run(_config(tiny_wan, dataset, tmp_path / "cache"))
    _, report = _run(_config(tiny_wan, dataset, tmp_path / "cache", **overlay))
    assert (report.latents_computed, report.texts_computed) == (latents, texts)


def test_random_placement_caches_one_entry_per_variant(tiny_wan: Path, dataset: Path, tmp_path: Path) -> None:
    config = _config(
        tiny_wan, dataset, tmp_path / "cache",
        extra={"cache_variants": 3, "video_config": {"max_frames": 17, "target_fps": 16.0, "frame_sample_strategy": "random"}},
    )
    plan, report = _run(config)
    videos = [s for s in plan.train if s.info.is_video]
    image = next(s for s in plan.train if not s.info.is_video)
    assert all(len(set(s.latent_keys)) == 3 for s in videos)
    assert len(image.latent_keys) == 1
    assert report.latents_computed == 3 * len(videos) + 1


def test_temporal_augmentation_changes_what_is_cached_and_off_changes_nothing(tiny_wan: Path, dataset: Path, tmp_path: Path) -> None:
    plain = _config(tiny_wan, dataset, tmp_path / "cache")
    augmented = _config(
        tiny_wan, dataset, tmp_path / "cache",
        extra={"cache_variants": 4, "video_config": {"max_frames": 9, "target_fps": 16.0, "temporal_augmentation": True}},
    )
    plain_plan, _ = _run(plain)
    plan, _ = _run(augmented)
    wide = next(s for s in plan.train if s.item.path.name == "wide.mp4")
    plain_wide = next(s for s in plain_plan.train if s.item.path.name == "wide.mp4")
    assert wide.latent_keys[0] == plain_wide.latent_keys[0]  # variant 0 is the plain selection
    assert len(set(wide.latent_keys)) > 1
    assert any(p.reversed or p.times != wide.plans[0].times for p in wide.plans[1:])
    cache = LatentCache(augmented["cache_dir"])
    first = cache.get(wide.latent_keys[0])["latents"]
    assert any(not torch.equal(first, cache.get(k)["latents"]) for k in wide.latent_keys[1:])


def test_a_file_that_fails_to_decode_is_left_out_and_named(
    tiny_wan: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = precompute.decode_frames

    def failing(path, times, info, **kw):
        if Path(path).name == "tall.mp4":
            raise UnusableMedia("truncated or corrupt: invalid data found when processing input")
        return real(path, times, info, **kw)

    monkeypatch.setattr(precompute, "decode_frames", failing)
    plan, report = _run(_config(tiny_wan, dataset, tmp_path / "cache"))
    assert [s.item.path.name for s in plan.train] == sorted(["wide.mp4", "still.png"]) or len(plan.train) == 2
    assert "tall.mp4" not in [s.item.path.name for s in plan.train]
    assert any("tall.mp4" in str(issue) and "truncated" in str(issue) for issue in report.failed)


def test_an_interrupted_caching_run_leaves_only_complete_entries(tiny_wan: Path, dataset: Path, tmp_path: Path) -> None:
    config = _config(tiny_wan, dataset, tmp_path / "cache")
    adapter = adapter_for(config)
    plan = plan_data(config, adapter, ContentHasher(config["cache_dir"]))
    calls = iter(range(100))
    report = fill_caches(plan, adapter, config["cache_dir"], should_stop=lambda: next(calls) >= 1)
    assert report.latents_computed == 1
    cache = LatentCache(config["cache_dir"])
    stored = [k for s in plan.train for k in s.latent_keys if cache.has(k)]
    assert len(stored) == 1 and cache.get(stored[0]) is not None
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    _, report = _run(config)
    assert (report.latents_computed, report.latents_reused) == (2, 1)


def test_strict_data_refuses_to_start(tiny_wan: Path, dataset: Path, tmp_path: Path) -> None:
    config = _config(tiny_wan, dataset, tmp_path / "cache", strict_data=True)
    with pytest.raises(UserError, match="broken.mp4"):
        plan_data(config, adapter_for(config), ContentHasher(config["cache_dir"]))


def test_cached_batches_come_out_of_the_loader(tiny_wan: Path, dataset: Path, tmp_path: Path) -> None:
    config = _config(tiny_wan, dataset, tmp_path / "cache", batch_size=2)
    plan, _ = _run(config)
    sampler = BucketBatchSampler(plan.sampler_records(), 2, config["video_config"]["video_batch_size_multiplier"], 0, steps=6)
    loader = make_loader(CachedSampleDataset(plan.cached_samples(), config["cache_dir"]), sampler, num_workers=0, pin_memory=False)
    shapes = []
    for batch in loader:
        latents = batch["latents"]
        assert latents.shape[1] == 16 and batch["prompt_embeds"].shape[:2] == (latents.shape[0], 512)
        shapes.append(tuple(latents.shape))
    assert len(shapes) == 6


def test_cache_command(tiny_wan: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process through main.main (the same parser and error boundary as the script) to spare two
    # torch imports; test_cli.py covers the real process.
    import main

    args = ["cache", "--set", f"base_model={tiny_wan}", "--set", f'datasets=[{{"path": "{dataset}"}}]',
            "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "resolution=64", "--set", "frames=9",
            "--set", "video_config.max_frames=9"]
    assert main.main(args) == 0
    first = capsys.readouterr()
    assert "latents: 3 computed, 0 already cached" in first.out and "broken.mp4" in first.err
    assert "Traceback" not in first.err
    assert main.main(args) == 0
    assert "latents: 0 computed, 3 already cached" in capsys.readouterr().out
    assert main.main(["cache", "--set", f"base_model={tmp_path / 'nowhere'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
