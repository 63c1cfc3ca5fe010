"""Issue 13, points 1-3: a run never deletes or overwrites what the app did not write, never writes into
the model or the data, finds an unwritable output before training, and keeps the trained weights
when the final save fails anyway; a diverged result is never saved.

Every refusal is one line naming the path and what to do, and every user file that existed before
is byte for byte the same after (hashed before and after). Write failures are simulated with
monkeypatch: the tests run as root, whom chmod does not stop.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_main
from media_factory import make_clip
from safetensors.torch import load, save_file

import core.export.lora as lora_module
from core.config import load_preset, resolve
from core.errors import ConfigError, UserError
from core.train import output_guard
from core.train.backup import BackupFolder
from core.train.events import TrainerCallbacks
from core.train.loop import Loop
from core.train.methods.base import WRITTEN_BY
from core.train.output_guard import Target, check_outputs, planned_targets
from core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_wan(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("wan21")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    make_clip(folder / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (folder / "clip.txt").write_text("a square moving across the frame", encoding="utf-8")
    return folder


def _config(model: Path, data: Path, root: Path, **overrides: Any) -> dict[str, Any]:
    overlay = {
        "base_model": str(model),
        "datasets": [{"path": str(data), "repeats": 1}],
        "workspace_dir": str(root / "workspace"),
        "cache_dir": str(root / "cache"),
        "output_path": str(root / "out" / "lora.safetensors"),
        "sampling": {"every_n_steps": 0},
        "backup": {"every_n_steps": 0},
        "dataloader_threads": 0,
        "max_steps": 2,
        "warmup_steps": 0,
    }
    config = resolve(dict(load_preset("#demo tiny wan LoRA")), overlay)
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return config


def _digest(*roots: Path) -> dict[str, str]:
    """Every file and folder under the roots, with its content's hash: what must not change."""
    out = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))]:
            if path.is_dir():
                out[str(path)] = "<folder>"
            elif path.exists():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _refused(config: dict[str, Any], *words: str) -> str:
    """Run, expect a refusal before any work, and return its one line."""
    with pytest.raises(UserError) as caught:
        Trainer(config).run()
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, (word, message)
    workspace, cache = Path(config["workspace_dir"]), Path(config["cache_dir"])
    assert not (workspace / "metrics.jsonl").exists(), "the run trained before refusing"
    assert not cache.exists() or not any(cache.iterdir()), "the run cached before refusing"
    return message


def _user_folder(root: Path) -> Path:
    """A folder of the user's own: notes, a sub-folder, a file of no format."""
    folder = root / "project"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes", encoding="utf-8")
    (folder / "sub" / "draft.bin").write_bytes(os.urandom(64))
    return folder


# -- 1. FINE_TUNE never replaces a folder the app did not write --------------------------------------
def test_1_fine_tune_into_a_folder_holding_notes_data_and_workspace_is_refused(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    project = _user_folder(tmp_path)
    shutil.copytree(clips, project / "clips")
    config = _config(tiny_wan, project / "clips", tmp_path, training_method="FINE_TUNE", output_path=str(project),
                     workspace_dir=str(project / "workspace"))
    before = _digest(project, tiny_wan)
    message = _refused(config, str(project), "choose an output_path")
    assert "dataset folder" in message  # the first reason found: the run's own data is in there
    assert _digest(project, tiny_wan) == before


def test_1_fine_tune_into_an_existing_folder_it_did_not_write_is_refused(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    project = _user_folder(tmp_path)
    config = _config(tiny_wan, clips, tmp_path, training_method="FINE_TUNE", output_path=str(project))
    before = _digest(project)
    _refused(config, str(project), "did not write", "video_trainer.json", "remove it yourself")
    assert _digest(project) == before


def test_1_fine_tune_output_holding_the_workspace_or_the_cache_is_refused(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    # Neither exists yet: the rule is about the paths, not about what is in them.
    for key, what in (("workspace_dir", "the workspace"), ("cache_dir", "the cache folder")):
        root = tmp_path / key
        config = _config(tiny_wan, clips, root, training_method="FINE_TUNE", output_path=str(root / "all"),
                         **{key: str(root / "all" / "inside")})
        _refused(config, f"holds {what}", key, "choose an output_path outside it")
        config = _config(tiny_wan, clips, root, training_method="FINE_TUNE", output_path=str(root / "same"),
                         **{key: str(root / "same")})
        _refused(config, f"is {what}", key)


def test_1_a_model_folder_the_app_wrote_but_holding_a_user_file_is_refused(tiny_wan: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ft"
    shutil.copytree(tiny_wan, folder)
    (folder / "video_trainer.json").write_text(json.dumps({"steps": 2}), encoding="utf-8")
    config = _config(tiny_wan, tmp_path / "data", tmp_path, training_method="FINE_TUNE", output_path=str(folder))
    adapter = type("Adapter", (), {"folder": tiny_wan, "transformer_names": lambda self: ("transformer",)})()
    assert check_outputs(config, adapter, ["transformer"])[0].path == folder  # the app's own: replaceable
    (folder / "README.md").write_text("how I trained it", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds README.md, which Video Trainer did not write") as caught:
        check_outputs(config, adapter, ["transformer"])
    assert caught.value.key == "output_path"


@pytest.mark.parametrize("key", ["output_path", "workspace_dir", "cache_dir"])
def test_1_an_empty_path_is_refused_and_the_working_directory_untouched(key: str, tiny_wan: Path, clips: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "mine.txt").write_text("mine", encoding="utf-8")
    monkeypatch.chdir(cwd)
    config = _config(tiny_wan, clips, tmp_path, **{"training_method": "FINE_TUNE", "output_path": str(tmp_path / "ft"), key: "  "})
    with pytest.raises(ConfigError) as caught:
        Trainer(config).run()
    assert caught.value.key == key and f"{key} is empty" in str(caught.value) and "\n" not in str(caught.value)
    assert _digest(cwd) == {str(cwd): "<folder>", str(cwd / "mine.txt"): hashlib.sha256(b"mine").hexdigest()}


def test_1_the_command_line_refuses_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    project = _user_folder(tmp_path)
    before = _digest(project)
    result = run_main("train", "--preset", "#demo tiny wan LoRA", "--set", "training_method=FINE_TUNE",
                      "--set", f"output_path={project}", "--set", f"workspace_dir={tmp_path / 'ws'}",
                      "--set", f"cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(project) in lines[0] and "did not write" in lines[0], result.stderr
    assert _digest(project) == before and not (tmp_path / "cache").exists()


# -- 2. the output is checked before the first step; a failed final save loses nothing --------------
@pytest.mark.parametrize(("code", "words"), [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full")])
def test_2_an_unwritable_output_folder_is_found_before_training(code: int, words: str, tiny_wan: Path, clips: Path,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code), str(kwargs.get("dir")))

    monkeypatch.setattr(output_guard.tempfile, "mkstemp", refuse)
    config = _config(tiny_wan, clips, tmp_path)
    message = _refused(config, str(tmp_path / "out" / "lora.safetensors"), "output_path", words)
    assert "probe" not in message


def test_2_an_output_under_a_file_is_refused_by_name(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    config = _config(tiny_wan, clips, tmp_path, output_path=str(tmp_path / "a-file" / "lora.safetensors"))
    _refused(config, f"{tmp_path / 'a-file'} is a file, not a folder")
    assert (tmp_path / "a-file").read_text(encoding="utf-8") == "x"


def test_2_a_full_disk_at_the_final_save_keeps_the_weights_and_resume_saves_them(tiny_wan: Path, clips: Path, tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tiny_wan, clips, tmp_path)
    output = Path(config["output_path"])
    attempted: list[bytes] = []
    real_write = lora_module.write_bytes_atomic

    def disk_full(path: Any, data: bytes) -> Path:
        attempted.append(data)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(lora_module, "write_bytes_atomic", disk_full)
    with pytest.raises(UserError) as caught:
        Trainer(config).run()
    message = str(caught.value)
    kept = Path(config["workspace_dir"]) / "backups" / "step-00000002"
    assert "\n" not in message
    for words in (str(output), "disk is full", f"kept in the backup {kept}", "--resume", "without training further"):
        assert words in message, (words, message)
    assert kept.is_dir() and not output.exists() and not any(output.parent.iterdir())

    # Finishing the save: the same settings, another output_path, --resume. Nothing more trains.
    monkeypatch.setattr(lora_module, "write_bytes_atomic", real_write)
    elsewhere = tmp_path / "elsewhere" / "lora.safetensors"
    result = Trainer({**config, "output_path": str(elsewhere)}, resume=True).run()
    assert result.steps == 2 and result.output_paths == [elsewhere]
    # The LoRA the failed save would have written, tensor for tensor (the header's key order varies).
    saved, wanted = load(elsewhere.read_bytes()), load(attempted[0])
    assert saved.keys() == wanted.keys() and all(torch.equal(saved[k], wanted[k]) for k in saved)
    assert output_guard.safetensors_metadata(elsewhere)["video_trainer.steps"] == "2"


def test_2_an_unknown_folder_appearing_at_the_output_during_the_run_is_kept_and_so_are_the_weights(
        tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    config = _config(tiny_wan, clips, tmp_path, backup={"every_n_steps": 0})
    output = Path(config["output_path"])

    class SomeoneMakesAFolder(TrainerCallbacks):
        def on_progress(self, step: int, total_steps: int, epoch: int, eta_seconds: float) -> None:
            if step == total_steps:
                output.mkdir(parents=True)
                (output / "theirs.txt").write_text("theirs", encoding="utf-8")

    with pytest.raises(UserError) as caught:
        Trainer(config, SomeoneMakesAFolder()).run()
    message = str(caught.value)
    assert "\n" not in message and f"{output} (output_path) is an existing folder" in message
    assert "step-00000002" in message and "--resume" in message
    assert (output / "theirs.txt").read_text(encoding="utf-8") == "theirs" and len(list(output.iterdir())) == 1
    assert BackupFolder(config["workspace_dir"]).newest().step == 2


# save_pretrained's own errors: an OSError, and safetensors' SafetensorError (its text is what a real
# full disk gave; SafetensorError is not importable, so a RuntimeError with that text stands in).
@pytest.mark.parametrize(("error", "words"), [
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "quota"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "disk is full"),
])
def test_2_a_fine_tune_save_failing_keeps_the_weights(error: Exception, words: str, tiny_wan: Path, clips: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from core.export import diffusers_folder

    def failing(module: Any, folder: Path) -> None:
        raise error

    monkeypatch.setattr(diffusers_folder, "_save_component", failing)
    config = _config(tiny_wan, clips, tmp_path, training_method="FINE_TUNE", output_path=str(tmp_path / "out" / "ft"))
    before = _digest(tiny_wan, clips)
    with pytest.raises(UserError) as caught:
        Trainer(config).run()
    message = str(caught.value)
    assert "\n" not in message and words in message and str(tmp_path / "out" / "ft") in message
    assert "kept in the backup" in message and BackupFolder(config["workspace_dir"]).newest().step == 2
    assert not list((tmp_path / "out").iterdir()), "the failed save left files behind"
    assert _digest(tiny_wan, clips) == before


def test_2_when_the_backup_fails_too_the_message_names_the_newest_backup(tiny_wan: Path, clips: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tiny_wan, clips, tmp_path, max_steps=3, backup={"every_n_steps": 2})
    real_write = BackupFolder.write

    def full_after_step_two(self: BackupFolder, step: int, *args: Any) -> Path:
        if step > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root))
        return real_write(self, step, *args)

    def disk_full(path: Any, data: bytes) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(BackupFolder, "write", full_after_step_two)
    monkeypatch.setattr(lora_module, "write_bytes_atomic", disk_full)
    with pytest.raises(UserError) as caught:
        Trainer(config).run()
    message = str(caught.value)
    assert "\n" not in message and "failed too" in message
    assert f"the newest backup is {Path(config['workspace_dir']) / 'backups' / 'step-00000002'} (step 2)" in message


# -- 3. never into the base model or the data ----------------------------------------------------------
def test_3_a_lora_inside_the_base_model_folder_is_refused(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    before = _digest(tiny_wan)
    weights = next((tiny_wan / "transformer").glob("*.safetensors"))
    for output in (tiny_wan / "lora.safetensors", weights):
        config = _config(tiny_wan, clips, tmp_path, output_path=str(output))
        _refused(config, str(output), f"lies inside the base model folder {tiny_wan} (base_model)")
    # Through a symlink, and with the LoRA's EMA copy the one inside.
    link = tmp_path / "link-to-model"
    link.symlink_to(tiny_wan, target_is_directory=True)
    _refused(_config(tiny_wan, clips, tmp_path, output_path=str(link / "lora.safetensors")), "the base model folder")
    assert _digest(tiny_wan) == before


def test_3_a_fine_tune_folder_holding_or_being_the_base_model_is_refused(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    before = _digest(tiny_wan)
    for output, relation in ((tiny_wan.parent, "holds"), (tiny_wan, "is")):
        config = _config(tiny_wan, clips, tmp_path, training_method="FINE_TUNE", output_path=str(output))
        _refused(config, f"{relation} the base model folder")
    assert _digest(tiny_wan) == before


def test_3_the_hub_cache_folder_and_the_single_file_checkpoint_are_protected(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--tiny--wan"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_wan, snapshot)
    (repo / "blobs").mkdir()
    config = _config(snapshot, clips, tmp_path, output_path=str(repo / "blobs" / "lora.safetensors"))
    _refused(config, "the base model's hub cache folder")

    checkpoint = tmp_path / "checkpoints" / "community.safetensors"
    checkpoint.parent.mkdir()
    shutil.copy2(next((tiny_wan / "transformer").glob("*.safetensors")), checkpoint)
    before = _digest(checkpoint.parent)
    config = _config(tiny_wan, clips, tmp_path, output_path=str(checkpoint), transformer={"model_path": str(checkpoint)})
    _refused(config, "is the transformer checkpoint", "transformer.model_path")
    config = _config(tiny_wan, clips, tmp_path, training_method="FINE_TUNE", output_path=str(checkpoint.parent),
                     transformer={"model_path": str(checkpoint)})
    _refused(config, "holds the transformer checkpoint")
    assert _digest(checkpoint.parent) == before


def test_3_an_output_in_a_dataset_folder_is_refused(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    before = _digest(clips)
    config = _config(tiny_wan, clips, tmp_path, output_path=str(clips / "lora.safetensors"))
    _refused(config, f"lies inside the dataset folder {clips} (datasets[0].path)")
    held = tmp_path / "validation-clips"
    held.mkdir()
    config = _config(tiny_wan, clips, tmp_path, output_path=str(held / "lora.safetensors"), validation={"folder": str(held)})
    _refused(config, "the validation folder", "validation.folder")
    assert _digest(clips) == before


# -- existing files where a file is written ------------------------------------------------------------
def test_an_existing_file_the_app_did_not_write_is_refused(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "lora.safetensors"
    output.parent.mkdir()
    save_file({"w": torch.ones(2)}, str(output), metadata={"format": "pt", "ss_network_dim": "8"})  # someone's LoRA
    before = _digest(output.parent)
    _refused(_config(tiny_wan, clips, tmp_path), str(output), "did not write", "choose another output_path")
    output.write_bytes(b"not a safetensors file at all")
    before = _digest(output.parent)
    _refused(_config(tiny_wan, clips, tmp_path, training_method="EMBEDDING", transformer={"train": False},
                     embedding={"placeholder_tokens": ["<concept>"], "initializer_words": ["square"]}), "did not write")
    assert _digest(output.parent) == before


def test_an_existing_folder_where_the_lora_goes_is_refused(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "lora.safetensors"
    output.mkdir(parents=True)
    (output / "inside.txt").write_text("x", encoding="utf-8")
    before = _digest(output)
    _refused(_config(tiny_wan, clips, tmp_path), f"{output} (output_path) is an existing folder")
    assert _digest(output) == before


def test_the_ema_copy_is_checked_like_the_result(tiny_wan: Path, clips: Path, tmp_path: Path) -> None:
    sibling = tmp_path / "out" / "lora-ema.safetensors"
    sibling.parent.mkdir()
    sibling.write_bytes(b"the user's file")
    config = _config(tiny_wan, clips, tmp_path, ema={"enabled": True})
    _refused(config, str(sibling), "the EMA copy of output_path", "did not write")
    assert sibling.read_bytes() == b"the user's file"


def test_what_the_app_wrote_is_recognised_and_every_expert_file_checked(tmp_path: Path) -> None:
    config = _config(tmp_path / "model", tmp_path / "data", tmp_path, ema={"enabled": True})
    two_experts = type("Adapter", (), {"folder": tmp_path / "model", "transformer_names": lambda self: ("transformer", "transformer_2")})()
    targets = planned_targets(config, two_experts, ["transformer", "transformer_2"])
    names = [t.path.name for t in targets]
    assert names == ["lora_high_noise.safetensors", "lora_low_noise.safetensors",
                     "lora-ema_high_noise.safetensors", "lora-ema_low_noise.safetensors"]
    out = tmp_path / "out"
    out.mkdir()
    save_file({"w": torch.ones(1)}, str(out / names[0]), metadata={**WRITTEN_BY})
    save_file({"w": torch.ones(1)}, str(out / names[1]), metadata={"video_trainer.steps": "4"})  # an earlier version's
    assert check_outputs(config, two_experts, ["transformer", "transformer_2"]) == targets
    save_file({"w": torch.ones(1)}, str(out / names[3]), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="lora-ema_low_noise.safetensors .the EMA copy of output_path"):
        check_outputs(config, two_experts, ["transformer", "transformer_2"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "the probe file was left behind"


# -- a diverged result is never saved ------------------------------------------------------------------
@pytest.fixture
def poisoned_at_step(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[TrainerCallbacks]]:
    """Callbacks that put a NaN into the first trained weight at a step, before that step's backup."""
    runs: list[Any] = []
    real_init = Loop.__init__

    def init(self: Loop, run: Any, result: Any) -> None:
        real_init(self, run, result)
        runs.append(run)

    monkeypatch.setattr(Loop, "__init__", init)

    class Poison(TrainerCallbacks):
        at = 2

        def on_progress(self, step: int, total_steps: int, epoch: int, eta_seconds: float) -> None:
            if step == self.at:
                with torch.no_grad():
                    runs[-1].parts.trainable()[0].view(-1)[0] = float("nan")

    yield Poison


def test_a_result_with_non_finite_weights_is_not_saved(tiny_wan: Path, clips: Path, tmp_path: Path,
                                                        poisoned_at_step: type[TrainerCallbacks]) -> None:
    config = _config(tiny_wan, clips, tmp_path, backup={"every_n_steps": 1, "keep": 5})
    with pytest.raises(UserError) as caught:
        Trainer(config, poisoned_at_step()).run()
    message = str(caught.value)
    good = Path(config["workspace_dir"]) / "backups" / "step-00000001"
    assert "\n" not in message
    for words in ("NaN or infinite", "diverged", "lower learning_rate", f"the last backup with finite weights is {good} (step 1)"):
        assert words in message, (words, message)
    assert not Path(config["output_path"]).exists()
    # The poisoned step-2 backup is passed over; no backup is added to hold the diverged weights.
    assert [b.step for b in BackupFolder(config["workspace_dir"]).complete()] == [1, 2]
