"""A sample between runs (core/train/sample_now.py) and one queued during a run with its own
parameters (TrainerCommands.request_sample(SampleRequest)): the tiny Wan demo model, trained 2 steps."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from core.config import load_preset
from core.errors import UserError
from core.export.video_file import read_video_frames
from core.models.base import SampleRequest
from core.models.registry import adapter_for
from core.train.events import TrainerCallbacks, TrainerCommands
from core.train.sample_now import _denoisers, make_sample, newest_weights
from core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEMO = "#demo tiny wan LoRA"
ASKED = SampleRequest("a red ball rolls", width=32, height=32, frames=5, steps=2, guidance_scale=1.0, seed=7)


def _config(folder: Path, cache: Path) -> dict[str, Any]:
    config = load_preset(DEMO)
    config.update(max_steps=2, warmup_steps=0, dataloader_threads=0, learning_rate=0.01,
                  workspace_dir=str(folder / "workspace"), cache_dir=str(cache),
                  output_path=str(folder / "out" / "demo.safetensors"))
    config["sampling"].update(every_n_steps=0, prompts=[])
    config["backup"]["every_n_steps"] = 2  # a backup of the last step, and the LoRA file after it
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("trained")
    config = _config(folder, folder / "cache")
    result = Trainer(config).run()
    assert result.steps == 2 and result.output_paths
    return config


def _copy(config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The trained workspace and output in a test's own folder (tests change them)."""
    copied = {**config, "workspace_dir": str(tmp_path / "workspace"), "output_path": str(tmp_path / "out" / "demo.safetensors")}
    copied["sampling"], copied["backup"], copied["lora"] = dict(config["sampling"]), dict(config["backup"]), dict(config["lora"])
    shutil.copytree(config["workspace_dir"], copied["workspace_dir"])
    shutil.copytree(Path(config["output_path"]).parent, Path(copied["output_path"]).parent)
    return copied


def _lora_params(module: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters() if "lora_" in name}


def test_between_runs_the_newest_lora_is_sampled_into_a_video_that_decodes(trained: dict[str, Any], tmp_path: Path) -> None:
    config = _copy(trained, tmp_path)
    weights = newest_weights(config, adapter_for(config))
    assert weights.kind == "lora" and weights.step == 2  # written after the step-2 backup
    first = make_sample(config, ASKED)
    assert first.path.parent == Path(config["workspace_dir"]) / "samples"
    assert first.path.name == "step-000002-w1-a-red-ball-rolls.mp4"
    frames = read_video_frames(first.path)
    assert frames.shape == (5, 32, 32, 3)
    second = make_sample(config, ASKED)  # the same request again: kept beside the first, and the same video
    assert second.path.name == "step-000002-w1-a-red-ball-rolls.mp4".replace("-w1-", "-w2-")
    assert first.path.is_file() and (read_video_frames(second.path) == frames).all()
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_the_weights_put_in_are_those_of_the_lora_file_or_the_backup(trained: dict[str, Any], tmp_path: Path) -> None:
    config = _copy(trained, tmp_path)
    adapter = adapter_for(config)
    weights = newest_weights(config, adapter)
    denoisers, _, _ = _denoisers(config, adapter, weights, torch.device("cpu"))
    in_file = {k.removeprefix("transformer."): v for k, v in load_file(weights.paths["transformer"]).items()}
    loaded = _lora_params(denoisers["transformer"])
    assert len(loaded) == len(in_file) > 0
    for name, value in loaded.items():  # peft names the adapter in the module path; the file does not
        assert torch.equal(value.to(in_file[name.replace(".default", "")].dtype), in_file[name.replace(".default", "")])
    assert any(v.abs().max() > 0 for k, v in loaded.items() if "lora_B" in k)  # trained: lora_B left zero

    Path(config["output_path"]).unlink()  # now the backup is the newest
    weights = newest_weights(config, adapter)
    assert weights.kind == "backup" and weights.step == 2
    denoisers, parts, _ = _denoisers(config, adapter, weights, torch.device("cpu"))
    saved = load_file(weights.paths["backup"] / "trained.safetensors")
    assert set(parts.named_trainable()) == set(saved)
    assert all(torch.equal(p.detach(), saved[name]) for name, p in parts.named_trainable().items())


def test_without_trained_weights_the_base_model_is_sampled(trained: dict[str, Any], tmp_path: Path) -> None:
    config = _copy(trained, tmp_path)
    shutil.rmtree(Path(config["workspace_dir"]) / "backups")
    Path(config["output_path"]).unlink()
    result = make_sample(config, ASKED)
    assert result.weights.kind == "base" and "base model" in result.weights.describe()
    assert result.path.name.startswith("step-000000-w1-") and read_video_frames(result.path).shape[0] == 5


def test_a_backup_of_other_settings_is_refused_by_name(trained: dict[str, Any], tmp_path: Path) -> None:
    config = _copy(trained, tmp_path)
    Path(config["output_path"]).unlink()
    config["lora"]["target_layers"] = ["to_q"]
    with pytest.raises(UserError, match=r"backups.step-00000002.*lora.rank or lora.target_layers"):
        make_sample(config, ASKED)
    with pytest.raises(UserError, match="needs a prompt"):
        make_sample(config, SampleRequest("  ", width=32, height=32, frames=5, steps=2, guidance_scale=1.0, seed=1))


class _Recorder(TrainerCallbacks):
    def __init__(self, commands: TrainerCommands, request: SampleRequest) -> None:
        self.commands, self.request = commands, request
        self.samples: list[Path] = []
        self.asked_at: int | None = None

    def on_progress(self, step: int, total_steps: int, epoch: int, eta_seconds: float | None) -> None:
        if step == 1:  # asked as step 1 ends: made before step 2 starts
            self.commands.request_sample(self.request)
            self.asked_at = step

    def on_sample(self, path: Path) -> None:
        self.samples.append(path)


def test_a_sample_queued_during_a_run_is_made_with_its_own_seed_and_frames(tmp_path: Path) -> None:
    config = _config(tmp_path, tmp_path / "cache")
    config["sampling"].update(prompts=["the configured prompt"], frames=9, width=64, height=64, seed=1)  # not used
    request = SampleRequest("a queued cat", width=32, height=48, frames=5, steps=2, guidance_scale=1.0, seed=11)
    commands = TrainerCommands()
    recorder = _Recorder(commands, request)
    Trainer(config, recorder, commands).run()
    assert [p.name for p in recorder.samples] == ["step-000001-w1-a-queued-cat.mp4"]  # after the step it was asked in
    video = read_video_frames(recorder.samples[0])
    assert video.shape == (5, 48, 32, 3)
    # The queued seed made it: the same request between runs with the same weights (a backup of step 1) gives it again.
    other = dict(config, workspace_dir=str(tmp_path / "again"), output_path=str(tmp_path / "again.safetensors"))
    other["backup"] = dict(config["backup"], every_n_steps=1)
    other["max_steps"] = 1
    Trainer(other).run()
    Path(other["output_path"]).unlink()  # the backup of step 1 (float32, as the run held it)
    again = make_sample(other, request)
    assert again.weights.kind == "backup" and again.weights.step == 1
    assert (read_video_frames(again.path) == video).all()
    reseeded = make_sample(other, SampleRequest(**{**vars(request), "seed": 12}))
    assert not (read_video_frames(reseeded.path) == video).all()


def test_commands_queue_asked_samples_apart_from_the_plain_request() -> None:
    commands = TrainerCommands()
    commands.request_sample(ASKED)
    commands.request_sample()
    commands.request_sample(SampleRequest(**{**vars(ASKED), "seed": 8}))
    assert [r.seed for r in commands.take_asked_samples()] == [7, 8]
    assert commands.take_asked_samples() == []
    assert commands.take_sample_request() is True and commands.take_sample_request() is False



def test_an_image_to_video_model_starts_from_the_first_clips_first_frame(tiny_model, tmp_path: Path) -> None:
    from media_factory import make_clip

    from core.config.settings import defaults

    config = defaults()
    clips = tmp_path / "clips"
    clips.mkdir()
    config.update(base_model=str(tiny_model("wan22_a14b_i2v")), workspace_dir=str(tmp_path / "ws"),
                  output_path=str(tmp_path / "out.safetensors"), train_dtype="FLOAT_32",
                  datasets=[{"path": str(clips), "repeats": 1}])
    config["transformer"]["weight_dtype"] = config["text_encoder"]["weight_dtype"] = "FLOAT_32"
    with pytest.raises(UserError, match="no clip or image in the datasets decodes"):
        make_sample(config, ASKED)
    make_clip(clips / "a.mp4", width=32, height=32, seconds=0.5)
    (clips / "a.txt").write_text("a ball", encoding="utf-8")
    result = make_sample(config, ASKED)
    assert result.weights.kind == "base" and read_video_frames(result.path).shape == (5, 32, 32, 3)
