"""The per-dataset options beside repeats: caption_prefix (what is encoded and cached),
caption_dropout (the empty caption, seeded per use) and loss_weight (that folder's share of the loss).
Runs are the tiny Wan model of tests/engine_runs.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_runs import Outcome, Runs, _trained, lora_equal, same_losses

from core.config import resolve
from core.data.cache import ContentHasher, TextCache
from core.data.dataset import CachedSample, CachedSampleDataset, caption_dropped, collate_batch
from core.data.discovery import discover_datasets, prefixed_caption
from core.data.plan import plan_data
from core.data.precompute import fill_caches
from core.models.conditions import load_text_encoders
from core.models.objectives import FlowMatching
from core.models.registry import adapter_for
from core.models.wan import WanAdapter
from core.train.objective import training_loss

CAPTION = "a square moving across the frame"  # the caption of engine_runs' clip


def _clip_dataset(**options: Any) -> Any:
    def value(env: Runs) -> list[dict[str, Any]]:
        return [{"path": str(env.clip), "repeats": 2, **options}]

    value.__name__ = "clip-" + "-".join(f"{k}={v}" for k, v in options.items())
    return value


def _recording_conditions(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """Every batch the model is called with: its prompt_embeds and caption_dropped flags."""
    seen: list[dict[str, torch.Tensor]] = []
    real = WanAdapter.predict

    def predict(self, transformer, noisy, sigmas, batch, **kwargs):
        seen.append({"prompt_embeds": batch["prompt_embeds"].detach().clone(), "caption_dropped": batch["caption_dropped"].clone()})
        return real(self, transformer, noisy, sigmas, batch, **kwargs)

    monkeypatch.setattr(WanAdapter, "predict", predict)
    return seen


def _collated_text(cache: Path, key: str) -> torch.Tensor:
    """The prompt_embeds a batch of one holds for a cached caption (the collate's padding)."""
    dataset = CachedSampleDataset([CachedSample(("unused",), key)], cache)
    entry = dataset.text.get_trimmed(key)
    assert entry is not None, f"text entry {key} is not cached"
    tensors, padding = entry
    return collate_batch([{"latents": torch.zeros(1), **tensors, "condition_padding": padding,
                           "sample_id": 0, "variant": 0, "step": 0}])["prompt_embeds"]


# -- caption_prefix ---------------------------------------------------------------------------------


def test_prefixed_caption_joins_with_the_separator() -> None:
    assert prefixed_caption("ohwx", ", ", "a man walking") == "ohwx, a man walking"
    assert prefixed_caption("  ohwx ", " ", "a man") == "ohwx a man"
    assert prefixed_caption("", ", ", "a man") == "a man"
    assert prefixed_caption("ohwx", ", ", "") == "ohwx"


def test_caption_prefix_changes_what_is_encoded_and_cached(runs: Runs, tmp_path: Path) -> None:
    def config(**options: Any) -> dict[str, Any]:
        return resolve({"base_model": str(runs.model), "cache_dir": str(tmp_path / "cache"), "resolution": 64, "frames": 9,
                        "video_config": {"max_frames": 9, "target_fps": 16.0},
                        "datasets": [{"path": str(runs.clip), **options}]})

    plain, prefixed = config(), config(caption_prefix="ohwx", caption_separator=" ")
    items, _ = discover_datasets(prefixed)
    assert [i.caption for i in items] == [f"ohwx {CAPTION}"]
    adapter = adapter_for(plain)
    plans = [plan_data(c, adapter, ContentHasher(c["cache_dir"])) for c in (plain, prefixed)]
    reports = [fill_caches(p, adapter, plain["cache_dir"]) for p in plans]
    assert plans[0].train[0].text_key != plans[1].train[0].text_key, "the prefix is part of the text key"
    assert plans[0].train[0].latent_keys == plans[1].train[0].latent_keys, "the latents do not depend on captions"
    assert reports[1].texts_computed == 1 and reports[1].latents_computed == 0, "changing the prefix re-encodes the caption only"
    load_text_encoders(adapter, "cpu", plans[1].text_weight_dtypes)
    expected = adapter.encode_text([f"ohwx {CAPTION}", CAPTION])
    adapter.unload_encoders()
    texts = TextCache(plain["cache_dir"])
    for row, plan in ((0, plans[1]), (1, plans[0])):
        cached = texts.get_conditions(plan.train[0].text_key)
        torch.testing.assert_close(cached["prompt_embeds"], expected["prompt_embeds"][row], rtol=0, atol=0)
    assert not torch.equal(expected["prompt_embeds"][0], expected["prompt_embeds"][1])


# -- caption_dropout --------------------------------------------------------------------------------


def test_caption_dropout_draws_are_seeded_per_use() -> None:
    draws = [caption_dropped(0.5, 3, step, 0, step // 2) for step in range(200)]
    assert draws == [caption_dropped(0.5, 3, step, 0, step // 2) for step in range(200)], "the same after a resume"
    assert 60 < sum(draws) < 140, "about half of the uses"
    assert draws != [caption_dropped(0.5, 4, step, 0, step // 2) for step in range(200)], "another seed, other draws"
    assert not any(caption_dropped(0.0, 3, step, 0, 0) for step in range(50))
    assert all(caption_dropped(1.0, 3, step, 0, 0) for step in range(50))


def test_caption_dropout_1_trains_on_the_empty_caption(runs: Runs, base: Outcome, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _recording_conditions(monkeypatch)
    outcome = runs.run({"datasets": _clip_dataset(caption_dropout=1.0)}, fresh=True)
    _trained(outcome, 3)
    assert outcome.cache_report.texts_computed + outcome.cache_report.texts_reused == 2, "the caption and the empty one"
    config = outcome.config
    adapter = adapter_for(config)
    plan = plan_data(config, adapter, ContentHasher(config["cache_dir"]))
    assert plan.empty_text_key is not None
    empty = _collated_text(Path(config["cache_dir"]), plan.empty_text_key)
    own = _collated_text(Path(config["cache_dir"]), plan.train[0].text_key)
    assert not torch.equal(empty, own)
    assert len(seen) == 3
    for batch in seen:
        assert batch["caption_dropped"].tolist() == [True]
        torch.testing.assert_close(batch["prompt_embeds"], empty, rtol=0, atol=0)
    # The empty caption's entry is what the text encoder makes of "".
    load_text_encoders(adapter, "cpu", plan.text_weight_dtypes)
    encoded = adapter.encode_text([""])
    adapter.unload_encoders()
    cached = TextCache(config["cache_dir"]).get_conditions(plan.empty_text_key)
    torch.testing.assert_close(cached["prompt_embeds"], encoded["prompt_embeds"][0], rtol=0, atol=0)
    assert outcome.losses != base.losses


def test_caption_dropout_0_is_todays_run(runs: Runs, base: Outcome, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _recording_conditions(monkeypatch)
    outcome = runs.run({"datasets": _clip_dataset(caption_dropout=0.0)}, fresh=True)
    _trained(outcome, 3)
    assert all(batch["caption_dropped"].tolist() == [False] for batch in seen)
    assert same_losses(outcome, base) and lora_equal(outcome, base)


# -- loss_weight -------------------------------------------------------------------------------------


def test_loss_weight_multiplies_a_samples_contribution() -> None:
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 3, 4, 4, generator=generator)
    target = torch.randn(2, 4, 3, 4, 4, generator=generator)
    sigmas = torch.tensor([0.3, 0.7])
    objective = FlowMatching("NONE")
    even, _ = training_loss(prediction, target, sigmas, objective, 0.5)
    weighted, _ = training_loss(prediction, target, sigmas, objective, 0.5, sample_weights=torch.tensor([2.0, 1.0]))
    first, _ = training_loss(prediction[:1], target[:1], sigmas[:1], objective, 0.5)
    # mean over B of w_i * l_i: weight 2 on the first sample adds its loss once more, over B = 2.
    torch.testing.assert_close(weighted - even, first / 2, rtol=1e-6, atol=0)
    ones, _ = training_loss(prediction, target, sigmas, objective, 0.5, sample_weights=torch.ones(2))
    assert torch.equal(ones, even)


def test_loss_weight_2_doubles_the_folders_loss(runs: Runs, base: Outcome) -> None:
    outcome = runs.run({"datasets": _clip_dataset(loss_weight=2.0)})
    _trained(outcome, 3)
    # The first batch is the same in both runs (same seed, untrained LoRA): its loss exactly doubles.
    assert outcome.batch_losses[0] == 2 * base.batch_losses[0]
    assert lora_equal(runs.run({"datasets": _clip_dataset(loss_weight=1.0)}), base)


def test_live_encoded_captions_follow_the_dropout() -> None:
    from core.train.loop import _captions_with_dropout

    captions = {0: "a", 1: "b"}.__getitem__
    of = _captions_with_dropout(lambda ids: [captions(i) for i in ids], {"caption_dropped": torch.tensor([False, True])})
    assert of([0, 1]) == ["a", ""]
    same = _captions_with_dropout(lambda ids: [captions(i) for i in ids], {"caption_dropped": torch.tensor([False, False])})
    assert same([0, 1]) == ["a", "b"]
