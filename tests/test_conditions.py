"""Text conditions as an open set of named tensors: whatever keys a family's encode_text returns go
through the text cache and the collate, each padded on its own axis with its own value, and reach
predict; live encodings merge into a cached batch key by key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from media_factory import make_clip

from core.data import dataset as dataset_module
from core.data.cache import EntryCache, TextCache, text_key
from core.data.dataset import PADDING, CachedSample, CachedSampleDataset, collate_batch
from core.models.conditions import ConditionSpec, pad_axis_to, used_length
from core.train.embedding import merge_live_embeddings

LENGTH, WIDTH, CHANNELS = 8, 4, 3
# Every kind a family may return: (L, D) padded on axis 0, a pooled (D,) vector with no padding,
# a (D, L) tensor padded on its last axis, a bool mask, and an attention bias padded with -inf.
LAYOUT = {
    "prompt_embeds": ConditionSpec(0, 0.0),
    "pooled_embeds": ConditionSpec(None),
    "embeds_channels_first": ConditionSpec(1, 0.0),
    "prompt_mask": ConditionSpec(0, False),
    "attention_bias": ConditionSpec(0, -math.inf),
}
CAPTIONS = ["two words", "a caption of five words", "one"]


def encode(captions: list[str]) -> dict[str, torch.Tensor]:
    """A stand-in for a family's encode_text: each caption's tokens are its words, padded to LENGTH."""
    out = {name: [] for name in LAYOUT}
    for i, caption in enumerate(captions):
        tokens = len(caption.split())
        keep = torch.arange(LENGTH) < tokens
        generator = torch.Generator().manual_seed(i)
        embeds = (torch.randn(LENGTH, WIDTH, generator=generator) + 3.0) * keep[:, None]
        out["prompt_embeds"].append(embeds)
        out["pooled_embeds"].append(torch.randn(WIDTH, generator=generator))
        out["embeds_channels_first"].append((torch.randn(CHANNELS, LENGTH, generator=generator) + 3.0) * keep)
        out["prompt_mask"].append(keep)
        out["attention_bias"].append(torch.where(keep, torch.zeros(LENGTH), torch.full((LENGTH,), -math.inf)))
    return {name: torch.stack(rows) for name, rows in out.items()}


def _fill(cache_dir: Path) -> list[CachedSample]:
    texts, latents = TextCache(cache_dir), EntryCache(cache_dir, "latents")
    encoded = encode(CAPTIONS)
    samples = []
    for row, caption in enumerate(CAPTIONS):
        key = text_key(caption, "fake-text:1", LENGTH)
        texts.put_conditions(key, {name: encoded[name][row] for name in LAYOUT}, LAYOUT)
        latent = text_key(f"latent {row}", "fake-vae:1", 0)
        latents.put(latent, {"latents": torch.full((2, 1, 2, 2), float(row))})
        samples.append(CachedSample((latent,), key))
    return samples


def test_each_key_is_stored_without_its_padding_and_read_back_exactly(tmp_path: Path) -> None:
    samples = _fill(tmp_path)
    encoded = encode(CAPTIONS)
    cache = TextCache(tmp_path)
    for row, (sample, caption) in enumerate(zip(samples, CAPTIONS)):
        tokens = len(caption.split())
        stored = cache.get(sample.text_key)
        assert stored["prompt_embeds"].shape == (tokens, WIDTH)
        assert stored["pooled_embeds"].shape == (WIDTH,)
        assert stored["embeds_channels_first"].shape == (CHANNELS, tokens)
        assert stored["prompt_mask"].shape == (tokens,) and stored["attention_bias"].shape == (tokens,)
        back = cache.get_conditions(sample.text_key)
        assert set(back) == set(LAYOUT)
        for name in LAYOUT:
            assert back[name].dtype == encoded[name].dtype and torch.equal(back[name], encoded[name][row]), name
    assert cache.has(samples[0].text_key, LAYOUT)
    assert not cache.has(samples[0].text_key, [*LAYOUT, "text_encoder_2_embeds"])  # encoded again by precompute


def test_the_collate_pads_each_key_on_its_own_axis_with_its_own_value(tmp_path: Path) -> None:
    dataset = CachedSampleDataset(_fill(tmp_path), tmp_path)
    items = [dataset[(i, 0, 4)] for i in range(len(CAPTIONS))]
    batch = collate_batch(items)
    encoded = encode(CAPTIONS)  # what the encoder gave: the batch must be exactly this
    for name in LAYOUT:
        assert batch[name].dtype == encoded[name].dtype and torch.equal(batch[name], encoded[name]), name
    assert PADDING not in batch and batch["step"] == 4
    # The padding itself, spelled out: zeros after the two words on the channels-first tensor's last
    # axis, False in the mask, -inf in the bias; the pooled vectors stacked as they are.
    assert (batch["embeds_channels_first"][0, :, 2:] == 0).all() and (batch["embeds_channels_first"][0, :, :2] != 0).all()
    assert batch["prompt_mask"].sum(dim=1).tolist() == [2, 5, 1]
    assert torch.isinf(batch["attention_bias"][2, 1:]).all() and (batch["attention_bias"][2, :1] == 0).all()
    assert batch["pooled_embeds"].shape == (3, WIDTH)


def test_a_worker_sends_only_the_batchs_longest_and_the_rest_is_padded_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from multiprocessing.reduction import ForkingPickler

    dataset = CachedSampleDataset(_fill(tmp_path), tmp_path)
    items = [dataset[(0, 0, 1)], dataset[(2, 0, 1)]]  # two words and one: 2 of the 8 positions travel
    monkeypatch.setattr(dataset_module, "get_worker_info", lambda: object())
    packed = collate_batch(items)
    shapes = {name: shape for name, _, shape, _, _ in packed.layout}
    assert shapes["prompt_embeds"] == (2, 2, WIDTH) and shapes["embeds_channels_first"] == (2, CHANNELS, 2)
    assert shapes["pooled_embeds"] == (2, WIDTH)
    batch = ForkingPickler.loads(ForkingPickler.dumps(packed)).unpack()
    full = encode(CAPTIONS)
    for name in LAYOUT:
        want = torch.stack([full[name][0], full[name][2]])
        assert batch[name].dtype == want.dtype and torch.equal(batch[name], want), name


def test_an_entry_written_before_conditions_were_named_is_still_read(tmp_path: Path) -> None:
    # What the text cache held before: one encoder's embeddings trimmed to the mask's tokens, and the
    # whole mask, without any layout in the metadata.
    key = text_key("old caption", "wan-text:1", 16)
    embeds = torch.randn(3, WIDTH)
    mask = torch.arange(16) < 3
    EntryCache(tmp_path, "text").put(key, {"prompt_embeds": embeds, "prompt_mask": mask})
    latent = text_key("latent", "vae", 0)
    EntryCache(tmp_path, "latents").put(latent, {"latents": torch.zeros(2, 1, 2, 2)})
    batch = collate_batch([CachedSampleDataset([CachedSample((latent,), key)], tmp_path)[(0, 0, 0)]])
    assert batch["prompt_embeds"].shape == (1, 16, WIDTH) and torch.equal(batch["prompt_embeds"][0, :3], embeds)
    assert (batch["prompt_embeds"][0, 3:] == 0).all() and torch.equal(batch["prompt_mask"][0], mask)


def test_live_rows_merge_key_by_key_and_widen_the_batch_on_each_axis(tmp_path: Path) -> None:
    dataset = CachedSampleDataset(_fill(tmp_path), tmp_path)
    cached = collate_batch([dataset[(0, 0, 0)], dataset[(2, 0, 0)]])
    # A batch as a worker sends it before the padding: two positions wide on every padded axis.
    narrow = {name: pad_axis_to(t, LAYOUT[name].pad_axis + 1, 2, LAYOUT[name].pad_value)
              if LAYOUT[name].pad_axis is not None else t for name, t in cached.items() if name in LAYOUT}
    live = {"indices": [1], **encode(["a caption of five words"])}
    merged = merge_live_embeddings(narrow, live, LAYOUT)
    assert merged["prompt_embeds"].shape == (2, 5, WIDTH) and merged["embeds_channels_first"].shape == (2, CHANNELS, 5)
    assert merged["prompt_mask"].tolist() == [[True, True, False, False, False], [True] * 5]
    assert torch.isinf(merged["attention_bias"][0, 2:]).all()
    assert torch.equal(merged["pooled_embeds"][1], live["pooled_embeds"][0])
    assert torch.equal(merged["embeds_channels_first"][1], live["embeds_channels_first"][0, :, :5])
    assert torch.equal(merged["prompt_embeds"][0, :2], cached["prompt_embeds"][0, :2])
    assert used_length(merged["prompt_embeds"][0], 0, 0.0) == 2


def test_every_key_reaches_predict_through_a_training_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import load_preset, resolve
    from core.models.tiny import build_tiny_model
    from core.models.wan import WanAdapter
    from core.train import trainer as trainer_module

    seen: list[dict[str, torch.Tensor]] = []

    class MoreConditions(WanAdapter):
        """The tiny Wan with two more keys, as a family with pooled and channels-first text would return."""

        def condition_layout(self) -> dict[str, ConditionSpec]:
            return {**super().condition_layout(), "pooled_embeds": ConditionSpec(None),
                    "embeds_channels_first": ConditionSpec(1, 0.0)}

        def encode_text(self, captions: list[str], grad: bool = False) -> dict[str, torch.Tensor]:
            out = super().encode_text(captions, grad)
            count = out["prompt_mask"].sum(dim=1, keepdim=True)
            return {**out, "pooled_embeds": out["prompt_embeds"].sum(dim=1) / count,
                    "embeds_channels_first": out["prompt_embeds"].transpose(1, 2).contiguous()}

        def predict(self, transformer, noisy, sigmas, batch, first_frame_fixed=None, condition=None):
            seen.append({k: batch[k].detach().cpu() for k in self.condition_layout()})
            return super().predict(transformer, noisy, sigmas, batch, first_frame_fixed, condition)

    model = build_tiny_model("wan21", tmp_path / "model")
    data = tmp_path / "data"
    for i, caption in enumerate(["a red square", "a blue circle moving to the left slowly"]):
        make_clip(data / f"clip{i}.mp4", width=64, height=64, fps=16, seconds=0.5)
        (data / f"clip{i}.txt").write_text(caption, encoding="utf-8")
    monkeypatch.setattr(trainer_module, "adapter_for", lambda config: MoreConditions(model, family="wan21"))
    config = resolve(dict(load_preset("#demo tiny wan LoRA")), {
        "base_model": str(model), "datasets": [{"path": str(data), "repeats": 1}],
        "workspace_dir": str(tmp_path / "workspace"), "cache_dir": str(tmp_path / "cache"),
        "output_path": str(tmp_path / "out" / "lora.safetensors"), "dataloader_threads": 0, "max_steps": 2,
        "batch_size": 2, "video_config": {"video_batch_size_multiplier": 1.0},
        "sampling": {"every_n_steps": 0}, "backup": {"every_n_steps": 0}, "validation": {"every_n_steps": 0}})
    trainer_module.Trainer(config).run()
    # Batches of both captions, 4 and 10 tokens (with the end token): each padded to the encoder's 512 in the collate.
    assert any(sorted(b["prompt_mask"].sum(dim=1).tolist()) == [4, 10] for b in seen), [b["prompt_mask"].sum(1) for b in seen]
    for batch in seen:
        assert set(batch) == {"prompt_embeds", "prompt_mask", "pooled_embeds", "embeds_channels_first"}
        embeds, mask = batch["prompt_embeds"], batch["prompt_mask"]
        assert embeds.shape[1] == 512 and batch["embeds_channels_first"].shape[2] == 512
        # What the cache and collate gave back is what the encoder computed, key by key.
        assert torch.equal(batch["embeds_channels_first"], embeds.transpose(1, 2))
        assert torch.allclose(batch["pooled_embeds"], embeds.sum(dim=1) / mask.sum(dim=1, keepdim=True))
        assert (embeds[~mask] == 0).all()


# -- a family with two text encoders -------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_encoders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Wan's text parts twice (seeds 0 and 1): text_encoder/tokenizer and text_encoder_2/tokenizer_2."""
    from core.models.tiny.wan import _text_encoder_and_tokenizer

    out = tmp_path_factory.mktemp("two-encoders")
    for seed, suffix in ((0, ""), (1, "_2")):
        text_encoder, tokenizer = _text_encoder_and_tokenizer(seed)
        text_encoder.save_pretrained(out / f"text_encoder{suffix}")
        tokenizer.save_pretrained(out / f"tokenizer{suffix}")
    return out


def _two_encoder_adapter(folder: Path):
    from core.models.wan import WanAdapter

    class TwoEncoders(WanAdapter):
        """Wan's text path plus a second UMT5, whose embeddings go in prompt_embeds_2."""

        text_encoder_names = ("text_encoder", "text_encoder_2")
        placeholder_encoders = ("text_encoder", "text_encoder_2")

        def __init__(self, folder: Path) -> None:
            super().__init__(folder, family="wan21")
            self._second: tuple = (None, None)
            self.loaded_dtypes: dict[str, torch.dtype] = {}

        def load_text_encoder(self, device, dtype, weight_dtype=None, *, name="text_encoder"):
            self.loaded_dtypes[name] = dtype
            if name == "text_encoder":
                return super().load_text_encoder(device, dtype, weight_dtype)
            from transformers import AutoTokenizer, UMT5EncoderModel

            if self._second[1] is None:
                encoder = UMT5EncoderModel.from_pretrained(self.folder / "text_encoder_2", dtype=dtype).requires_grad_(False).eval()
                self._second = (AutoTokenizer.from_pretrained(self.folder / "tokenizer_2"), encoder)
            return self._second[1]

        def text_parts(self):
            return {**super().text_parts(), "text_encoder_2": self._second}

        def condition_layout(self):
            return {**super().condition_layout(), "prompt_embeds_2": ConditionSpec(0, 0.0)}

        def encode_text(self, captions, grad=False):
            out = super().encode_text(captions, grad)
            tokenizer, encoder = self._second
            ids = tokenizer(captions, padding="max_length", max_length=self.max_text_length, truncation=True,
                            return_tensors="pt").input_ids
            with torch.enable_grad() if grad else torch.no_grad():
                hidden = encoder(ids).last_hidden_state.float()
            return {**out, "prompt_embeds_2": hidden * out["prompt_mask"][:, :, None]}

    return TwoEncoders(folder)


def _config_with_second_encoder(tmp_path: Path, **sections: dict) -> dict:
    from core.config.settings import defaults

    config = defaults()
    # The section a family with a second encoder adds to the schema: a copy of text_encoder's.
    config["text_encoder_2"] = dict(config["text_encoder"])
    for name, values in sections.items():
        config[name] = {**config[name], **values} if isinstance(config.get(name), dict) else values
    config["output_path"] = str(tmp_path / "out" / "concept.safetensors")
    return config


def test_textual_inversion_adds_the_tokens_to_every_placeholder_encoder(two_encoders: Path, tmp_path: Path) -> None:
    from core.train.embedding import load_embedding
    from core.train.methods.embedding import EmbeddingParts

    adapter = _two_encoder_adapter(two_encoders)
    config = _config_with_second_encoder(
        tmp_path, training_method="EMBEDDING", text_encoder={"weight_dtype": "FLOAT_32"},
        text_encoder_2={"weight_dtype": "BFLOAT_16"},
        embedding={"placeholder_tokens": ["<concept>"], "initializer_words": ["person"]})
    parts = EmbeddingParts(config, adapter, torch.device("cpu"))
    parts.load([], lambda name: None)
    # Each encoder in its own section's weight_dtype, each with its own rows of its own width.
    assert adapter.loaded_dtypes == {"text_encoder": torch.float32, "text_encoder_2": torch.bfloat16}
    assert set(parts.named_trainable()) == {"embedding/rows", "embedding/text_encoder_2/rows"}
    assert len(parts.param_groups()[0]["params"]) == 2
    cached = {name: t.detach() for name, t in adapter.encode_text(["a plain caption", "a plain one"]).items()}
    batch = parts.prepare_batch({**cached, "sample_ids": [0, 1]}, lambda ids: ["<concept> walks", "a plain one"])
    (batch["prompt_embeds"].sum() + batch["prompt_embeds_2"].float().sum()).backward()
    assert all(rows.grad is not None and rows.grad.abs().sum() > 0 for rows in parts.trainable())
    paths = parts.save([], 1)
    assert paths == EmbeddingParts.result_paths(config, adapter, []) == [
        tmp_path / "out" / "concept.safetensors", tmp_path / "out" / "concept_text_encoder_2.safetensors"]
    fresh = _two_encoder_adapter(two_encoders)
    fresh.load_text_encoder("cpu", torch.float32)
    fresh.load_text_encoder("cpu", torch.float32, name="text_encoder_2")
    for path, (name, placeholders) in zip(paths, parts.by_encoder.items()):
        loaded = load_embedding(path, *fresh.text_parts()[name])  # each file is a one-encoder file for its encoder
        assert torch.equal(loaded.rows, placeholders.rows.detach())


def test_fine_tuning_trains_the_encoders_whose_section_says_train(two_encoders: Path, tmp_path: Path) -> None:
    from core.train.methods.finetune import FineTuneParts
    from core.train.support import refusals

    adapter = _two_encoder_adapter(two_encoders)
    config = _config_with_second_encoder(tmp_path, training_method="FINE_TUNE", output_path="x",
                                         text_encoder_2={"train": True, "weight_dtype": "FLOAT_32", "learning_rate": 1e-5})
    parts = FineTuneParts(config, adapter, torch.device("cpu"))
    parts.load([], lambda name: None)
    assert list(parts.text_encoders) == ["text_encoder_2"] and parts.keeps_text_encoder
    assert [(g["name"], g["lr"]) for g in parts.param_groups()] == [("text_encoder_2", 1e-5)]
    assert all(name.startswith("text_encoder_2/") for name in parts.named_trainable())
    first = adapter.text_parts()["text_encoder"][1]
    assert not any(p.requires_grad for p in first.parameters())  # loaded (encode_text runs it) but frozen
    batch = parts.prepare_batch({"prompt_embeds": None, "sample_ids": [0]}, lambda ids: ["a caption"])
    assert set(batch) == {"prompt_embeds", "prompt_mask", "prompt_embeds_2", "sample_ids"}
    assert batch["prompt_embeds_2"].requires_grad and not batch["prompt_embeds"].requires_grad
    # A LoRA run refuses training the second encoder by its own section's name.
    lora = {**config, "training_method": "LORA", "output_path": "x.safetensors"}
    keys = [p.key for p in refusals(lora, text_encoders=adapter.text_encoder_names)]
    assert keys == ["text_encoder_2.train"]
