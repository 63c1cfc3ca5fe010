"""FINE_TUNE and EMBEDDING end to end on tiny models: they train, save, and load back; and the bundled
"#wan 2.2 Finetune" and "#wan 2.2 Embedding" presets run with only the model (plus the data, where
files go, and the run's length) changed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from media_factory import make_clip

from core.config import load_preset, resolve
from core.train.backup import BackupFolder
from core.train.events import TrainerCallbacks, TrainerCommands
from core.train.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_wan(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("wan21")


@pytest.fixture(scope="module")
def tiny_ti2v(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("wan22_ti2v_5b")


@pytest.fixture(scope="module")
def concept_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("concept")
    for i, caption in enumerate(["a photo of <concept> moving right", "<concept> at rest"]):
        make_clip(folder / f"clip{i}.mp4", width=64 + 32 * i, height=64, fps=16, seconds=1.0)
        (folder / f"clip{i}.txt").write_text(caption, encoding="utf-8")
    return folder


def run_config(preset: str, model: Path, data: Path, root: Path, **overrides) -> dict:
    overlay = {
        "base_model": str(model),
        "datasets": [{"path": str(data), "repeats": 1}],
        "workspace_dir": str(root / "workspace"),
        "cache_dir": str(root.parent / "cache"),
        "dataloader_threads": 0,
        "max_steps": 3,
        "sampling": {"every_n_steps": 0},
        "backup": {"every_n_steps": 0},
        **overrides,
    }
    return resolve(dict(load_preset(preset)), overlay)


def demo_config(model: Path, data: Path, root: Path, **overrides) -> dict:
    return run_config("#demo tiny wan LoRA", model, data, root, **overrides)


def test_fine_tune_with_text_encoder_and_fused_backward_saves_a_pipeline_folder(tiny_wan: Path, concept_clips: Path, tmp_path: Path) -> None:
    from diffusers import WanPipeline

    output = tmp_path / "out" / "finetuned"
    config = demo_config(tiny_wan, concept_clips, tmp_path, training_method="FINE_TUNE", output_path=str(output),
                         optimizer="ADAFACTOR", fused_backward=True, max_grad_norm=0.0,
                         text_encoder={"train": True, "learning_rate": 1e-4, "weight_dtype": "FLOAT_32"})
    result = Trainer(config).run()
    assert result.output_paths == [output]
    base = WanPipeline.from_pretrained(tiny_wan)
    tuned = WanPipeline.from_pretrained(output)
    changed = [n for n, p in tuned.transformer.named_parameters() if not torch.equal(p, base.transformer.state_dict()[n])]
    assert len(changed) > len(list(base.transformer.parameters())) // 2
    encoder_changed = [n for n, p in tuned.text_encoder.named_parameters()
                       if not torch.equal(p, base.text_encoder.state_dict()[n])]
    assert encoder_changed, "text_encoder.train is on: its weights must have moved"
    # The base model folder is untouched.
    assert not any(p.name.startswith(".") for p in output.parent.iterdir())


def test_fine_tune_resumes_exactly(tiny_wan: Path, concept_clips: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    def config(root: Path) -> dict:
        return demo_config(tiny_wan, concept_clips, root, training_method="FINE_TUNE", output_path=str(root / "ft"),
                           optimizer="ADAMW", max_steps=4, backup={"every_n_steps": 2, "keep": 2})

    Trainer(config(tmp_path / "whole")).run()
    commands = TrainerCommands()

    class StopAtThree(TrainerCallbacks):
        def on_progress(self, step, total_steps, epoch, eta_seconds):
            if step == 3:
                commands.request_stop()

    Trainer(config(tmp_path / "split"), StopAtThree(), commands).run()
    assert BackupFolder(tmp_path / "split" / "workspace").newest().step == 3
    Trainer(config(tmp_path / "split"), resume=True).run()
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "whole" / "ft" / weights)), load_file(str(tmp_path / "split" / "ft" / weights))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_embedding_trains_only_the_new_rows_and_loads_back(tiny_wan: Path, concept_clips: Path, tmp_path: Path) -> None:
    from core.train.embedding import load_embedding
    from core.models.wan import WanAdapter

    output = tmp_path / "out" / "concept.safetensors"
    config = demo_config(tiny_wan, concept_clips, tmp_path, training_method="EMBEDDING", output_path=str(output),
                         transformer={"train": False}, embedding_learning_rate=0.05,
                         embedding={"placeholder_tokens": ["<concept>"], "initializer_words": ["square"]},
                         ema={"enabled": True, "decay": 0.5})
    result = Trainer(config).run()
    assert result.output_paths == [output, output.with_name("concept-ema.safetensors")]

    adapter = WanAdapter(tiny_wan)
    adapter.load_text_encoder("cpu", torch.float32)
    tokenizer, encoder = adapter.text_parts()["text_encoder"]
    square = adapter.encode_text(["square"])["prompt_embeds"]
    placeholders = load_embedding(output, tokenizer, encoder)
    assert placeholders.tokens == ["<concept>"]
    # The trained row moved away from its initializer word's embedding; the rest of the table did not.
    table = encoder.get_input_embeddings().weight
    start = table[tokenizer("square", add_special_tokens=False).input_ids].float().mean(0)
    assert not torch.allclose(placeholders.rows[0].float(), start, atol=1e-4)
    assert torch.equal(adapter.encode_text(["square"])["prompt_embeds"], square)


def test_embedding_preset_runs_on_the_tiny_model(tiny_ti2v: Path, concept_clips: Path, tmp_path: Path) -> None:
    config = run_config("#wan 2.2 Embedding", tiny_ti2v, concept_clips, tmp_path,
                        output_path=str(tmp_path / "out" / "embedding.safetensors"))
    assert config["training_method"] == "EMBEDDING"
    result = Trainer(config).run()
    assert result.steps == 3 and result.output_paths[0].exists()


def test_finetune_preset_runs_on_the_tiny_model(tiny_ti2v: Path, concept_clips: Path, tmp_path: Path) -> None:
    from diffusers import WanPipeline

    config = run_config("#wan 2.2 Finetune", tiny_ti2v, concept_clips, tmp_path, output_path=str(tmp_path / "out" / "ft"))
    assert config["training_method"] == "FINE_TUNE" and config["text_encoder"]["train"]
    result = Trainer(config).run()
    assert result.steps == 3
    WanPipeline.from_pretrained(result.output_paths[0])
