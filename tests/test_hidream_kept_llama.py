"""text_encoder_4.keep_loaded: HiDream's Llama stays loaded (quantized where its weight_dtype says so)
and encodes each batch's captions during training, validation included, instead of the text cache
holding its layers; unquantized, a run trains exactly as the cached run does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from core.models.hidream import HiDreamAdapter
from core.train.metrics_reader import read_metrics
from core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_hd(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("hidream")


@pytest.fixture
def one_image(tmp_path: Path) -> Path:
    from media_factory import make_image

    folder = tmp_path / "image"
    folder.mkdir()
    make_image(folder / "image.png", width=64, height=64, index=3)
    (folder / "image.txt").write_text("a gray square with a marker", encoding="utf-8")
    held_out = tmp_path / "validation"
    held_out.mkdir()
    make_image(held_out / "other.png", width=64, height=64, index=5)
    # The same caption: one text cache entry, so every encoder runs on batches of one caption in both
    # paths (the same shapes, hence the same float32 kernels and roundings).
    (held_out / "other.txt").write_text("a gray square with a marker", encoding="utf-8")
    return folder


@pytest.fixture
def kept_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Each encode_kept_text call: its captions and how the Llama it ran was stored."""
    from core.memory.quantize import quantized_layer_names

    calls: list[dict] = []
    original = HiDreamAdapter.encode_kept_text

    def recording(self, captions):
        encoder = self.text_parts()["text_encoder_4"][1]
        calls.append({"captions": list(captions), "quantized": len(quantized_layer_names(encoder)) if encoder is not None else None})
        return original(self, captions)

    monkeypatch.setattr(HiDreamAdapter, "encode_kept_text", recording)
    return calls


def _run(model: Path, data: Path, root: Path, **overrides):
    from test_hidream import hd_config

    config = hd_config(model, data, root, max_steps=3, learning_rate=0.01,
                       validation={"every_n_steps": 3, "folder": str(data.parent / "validation")}, **overrides)
    result = Trainer(config).run()
    return result, read_metrics(root / "workspace" / "metrics.jsonl")


def _cached_keys(root: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for path in (root / "cache" / "text").rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys |= set(f.keys())
    return keys


def test_kept_unquantized_trains_exactly_as_cached(tiny_hd: Path, one_image: Path, tmp_path: Path, kept_calls: list[dict]) -> None:
    from safetensors.torch import load_file

    cached, cached_records = _run(tiny_hd, one_image, tmp_path / "cached")
    assert not kept_calls
    assert _cached_keys(tmp_path / "cached") == {"t5_embeds", "llama_embeds", "pooled_embeds"}
    kept, kept_records = _run(tiny_hd, one_image, tmp_path / "kept", text_encoder_4={"keep_loaded": True})
    # The cache holds the other encoders' conditions only; the Llama encoded every step and the validation.
    assert _cached_keys(tmp_path / "kept") == {"t5_embeds", "pooled_embeds"}
    assert [c["captions"] for c in kept_calls] == [["a gray square with a marker"]] * (3 + 1)
    assert all(c["quantized"] == 0 for c in kept_calls)
    # The same caption through the same float32 encoders, in batches of one either way: the same numbers.
    assert [r["loss"] for r in kept_records] == [r["loss"] for r in cached_records]
    assert [r.get("val_loss") for r in kept_records] == [r.get("val_loss") for r in cached_records]
    (a,), (b,) = cached.output_paths, kept.output_paths
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("weight_dtype", ["FLOAT_8", "NFLOAT_4"])
def test_a_quantized_kept_llama_runs_in_training_and_sampling(tiny_hd: Path, one_image: Path, tmp_path: Path,
                                                              kept_calls: list[dict], weight_dtype: str) -> None:
    """FLOAT_8 through optimum-quanto, NFLOAT_4 through bitsandbytes (which runs on this CPU too)."""
    result, records = _run(tiny_hd, one_image, tmp_path, text_encoder_4={"keep_loaded": True, "weight_dtype": weight_dtype},
                           sampling={"every_n_steps": 2, "prompts": ["a cat"], "width": 32, "height": 32, "frames": 1,
                                     "inference_steps": 2})
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    # Steps 1-3 and the validation, the sample after step 2 between them: the Llama stayed loaded, quantized.
    assert len(kept_calls) == 4 and all(c["quantized"] for c in kept_calls)
    assert len(list((tmp_path / "workspace" / "samples").glob("step-000002-*.png"))) == 1


def test_a_kept_llama_cannot_learn_embeddings(tiny_hd: Path, one_image: Path, tmp_path: Path) -> None:
    from core.train.support import capability_refusals
    from test_hidream import hd_config

    config = hd_config(tiny_hd, one_image, tmp_path, training_method="EMBEDDING", text_encoder_4={"keep_loaded": True})
    adapter = HiDreamAdapter(tiny_hd)
    adapter.configure(config)
    keys = [e.key for e in capability_refusals(config, adapter)]
    assert "text_encoder_4.keep_loaded" in keys
    with pytest.raises(ConfigError):
        Trainer(config).run()
