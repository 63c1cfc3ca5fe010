"""FINE_TUNE and EMBEDDING of Hunyuan Video on the tiny model: a fine-tuned folder (transformer and,
when their sections say train, the text encoders) that HunyuanVideoPipeline.from_pretrained loads;
an embedding over both tokenizers (Llama and CLIP, each its own rows and file) that loads back and
changes the encoded prompt; the two presets train with only model, data and output changed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from media_factory import make_clip
from test_hunyuan_video import hv_config

from core.config import list_presets, load_preset, resolve
from core.models.hunyuan_video import HunyuanVideoAdapter
from core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_hv(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("hunyuan_video")


@pytest.fixture(scope="module")
def concept_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("concept")
    make_clip(folder / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (folder / "clip.txt").write_text("a photo of <concept> moving right", encoding="utf-8")
    return folder


def _changed(tuned: torch.nn.Module, base: torch.nn.Module) -> list[str]:
    state = base.state_dict()
    return [n for n, p in tuned.named_parameters() if not torch.equal(p, state[n])]


@pytest.mark.parametrize("trained, frozen", [("text_encoder_2", "text_encoder"), ("text_encoder", "text_encoder_2")])
def test_fine_tune_saves_a_folder_the_pipeline_loads(tiny_hv: Path, concept_clip: Path, tmp_path: Path,
                                                    trained: str, frozen: str) -> None:
    from diffusers import HunyuanVideoPipeline

    output = tmp_path / "out" / "ft"
    config = hv_config(tiny_hv, concept_clip, tmp_path, training_method="FINE_TUNE", output_path=str(output),
                       optimizer="ADAFACTOR", fused_backward=True, max_grad_norm=0.0,
                       **{trained: {"train": True, "learning_rate": 1e-4}})
    result = Trainer(config).run()
    assert result.output_paths == [output] and result.steps == 3
    base, tuned = HunyuanVideoPipeline.from_pretrained(tiny_hv), HunyuanVideoPipeline.from_pretrained(output)
    assert len(_changed(tuned.transformer, base.transformer)) > len(list(base.transformer.parameters())) // 2
    assert _changed(getattr(tuned, trained), getattr(base, trained)), f"{trained}.train is on: its weights must have moved"
    assert not _changed(getattr(tuned, frozen), getattr(base, frozen))  # its section says frozen
    tuned.set_progress_bar_config(disable=True)
    video = tuned("a cat", height=32, width=32, num_frames=5, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert video.shape == (1, 5, 3, 32, 32) and torch.isfinite(video).all()


def test_embedding_trains_both_tokenizers_rows_that_load_back_and_change_the_prompt(tiny_hv: Path, concept_clip: Path,
                                                                                    tmp_path: Path) -> None:
    from core.train.embedding import load_embedding

    output = tmp_path / "out" / "concept.safetensors"
    config = hv_config(tiny_hv, concept_clip, tmp_path, training_method="EMBEDDING", output_path=str(output),
                       transformer={"train": False}, embedding_learning_rate=0.05,
                       embedding={"placeholder_tokens": ["<concept>"], "initializer_words": ["square"]})
    result = Trainer(config).run()
    clip_file = output.with_name("concept_text_encoder_2.safetensors")
    assert result.output_paths == [output, clip_file]

    adapter = HunyuanVideoAdapter(tiny_hv)
    for name in adapter.text_encoder_names:
        adapter.load_text_encoder("cpu", torch.float32, name=name)
    prompt = ["a photo of <concept> moving right"]
    before, plain = adapter.encode_text(prompt), adapter.encode_text(["a photo of a square"])
    parts = adapter.text_parts()
    for name, path in (("text_encoder", output), ("text_encoder_2", clip_file)):
        tokenizer, encoder = parts[name]
        start = encoder.get_input_embeddings().weight[tokenizer("square", add_special_tokens=False).input_ids].float().mean(0)
        placeholders = load_embedding(path, tokenizer, encoder)
        assert placeholders.tokens == ["<concept>"]
        assert not torch.allclose(placeholders.rows[0].float(), start, atol=1e-4), name  # the row trained
        assert len(tokenizer("<concept>", add_special_tokens=False).input_ids) == 1  # one new token
    after = adapter.encode_text(prompt)
    # Both conditions move: Llama's token embeddings and CLIP's pooled vector.
    assert not torch.allclose(after["prompt_embeds"], before["prompt_embeds"])
    assert not torch.allclose(after["pooled_projections"], before["pooled_projections"])
    # A caption without the placeholder encodes as before: the rest of both tables did not move.
    again = adapter.encode_text(["a photo of a square"])
    assert all(torch.equal(again[k], plain[k]) for k in plain)


@pytest.mark.parametrize("preset, method, output", [("#hunyuan video Finetune", "FINE_TUNE", "ft"),
                                                    ("#hunyuan video Embedding", "EMBEDDING", "concept.safetensors")])
def test_presets_train_the_tiny_model_with_only_model_data_and_output_changed(tiny_hv: Path, concept_clip: Path, tmp_path: Path,
                                                                              preset: str, method: str, output: str) -> None:
    info = {p.name: p for p in list_presets()}[preset]
    assert info.bundled and info.error is None and info.description
    loaded = load_preset(preset)
    assert loaded["model_type"] == "HUNYUAN_VIDEO" and loaded["training_method"] == method
    config = resolve(dict(loaded), {
        "base_model": str(tiny_hv),
        "datasets": [{"path": str(concept_clip), "repeats": 1}],
        "output_path": str(tmp_path / "out" / output),
        # Where files go and the run's length, as the other preset tests set them.
        "workspace_dir": str(tmp_path / "workspace"),
        "cache_dir": str(tmp_path / "cache"),
        "dataloader_threads": 0,
        "max_steps": 2,
        "sampling": {"every_n_steps": 0},
        "backup": {"every_n_steps": 0},
    })
    result = Trainer(config).run()
    assert result.steps == 2 and result.final_loss is not None and result.output_paths[0] == tmp_path / "out" / output
    assert all(path.exists() for path in result.output_paths)
