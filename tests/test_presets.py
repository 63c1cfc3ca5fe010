"""Presets: bundled and user presets, versions and migrations, bad files, atomic saves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from core.config import (
    list_presets,
    load_preset,
    migrations,
    read_config_file,
    resolve,
    save_user_preset,
    sparse,
)
from core.config.files import write_config_file
from core.config.presets import delete_user_preset, find_preset
from core.errors import ConfigError
from core.paths import app_root, user_preset_dir

BUNDLED = ["#wan 2.2 LoRA", "#wan 2.2 LoRA 8GB", "#wan 2.2 Finetune", "#wan 2.2 Embedding", "#demo tiny wan LoRA"]

# The JSON examples of the product's seed document, verbatim.
SEED_EXAMPLES = {
    "lora": """{
    "training_method": "LORA",
    "batch_size": 2,
    "learning_rate": 0.0003,
    "transformer": {
        "train": true
    },
    "text_encoder": {
        "train": false
    }
}""",
    "finetune": """{
    "training_method": "FINE_TUNE",
    "batch_size": 1,
    "learning_rate": 0.0001,
    "transformer": {
        "train": true
    },
    "text_encoder": {
        "train": true,
        "learning_rate": 0.00005
    }
}""",
    "embedding": """{
    "training_method": "EMBEDDING",
    "batch_size": 4,
    "learning_rate": 0.001,
    "embedding_learning_rate": 0.005
}""",
}


def test_bundled_presets_are_listed_and_load() -> None:
    infos = {p.name: p for p in list_presets()}
    for name in BUNDLED:
        assert name in infos and infos[name].bundled and infos[name].error is None
        assert infos[name].description
        config = load_preset(name)
        assert config["training_method"] in ("LORA", "FINE_TUNE", "EMBEDDING")


def test_bundled_presets_follow_the_memory_table() -> None:
    # Seed memory table for Wan 2.2: 8 GB -> batch 1, 8 frames, 384x384; 16 GB -> batch 2, 16, 512.
    small = load_preset("#wan 2.2 LoRA 8GB")
    assert (small["batch_size"], small["resolution"]) == (1, 384)
    assert small["frames"] in (8, 9)  # 8 frames, as the nearest 4n+1 count Wan accepts
    assert small["transformer"]["weight_dtype"] in ("FLOAT_8", "NFLOAT_4")
    assert small["gradient_checkpointing"] == "CPU_OFFLOADED" and small["layer_offload_fraction"] > 0
    standard = load_preset("#wan 2.2 LoRA")
    assert (standard["batch_size"], standard["resolution"], standard["frames"]) == (2, 512, 17)
    finetune = load_preset("#wan 2.2 Finetune")
    assert finetune["training_method"] == "FINE_TUNE" and finetune["text_encoder"]["learning_rate"] == 0.00005


def test_demo_preset_points_into_the_install_folder() -> None:
    config = load_preset("#demo tiny wan LoRA")
    data = Path(config["datasets"][0]["path"])
    assert data == app_root() / "resources" / "demo_dataset"


@pytest.mark.parametrize("name", sorted(SEED_EXAMPLES))
def test_seed_examples_load_verbatim_as_presets(name: str) -> None:
    folder = user_preset_dir()
    folder.mkdir(parents=True)
    (folder / f"seed {name}.json").write_text(SEED_EXAMPLES[name], encoding="utf-8")
    config = load_preset(f"seed {name}")
    expected = json.loads(SEED_EXAMPLES[name])
    for key, value in expected.items():
        if isinstance(value, dict):
            assert {k: config[key][k] for k in value} == value
        else:
            assert config[key] == value
    assert f"seed {name}" in [p.name for p in list_presets() if not p.bundled]


def test_user_preset_saves_atomically_lists_and_reloads_equal() -> None:
    config = load_preset("#wan 2.2 LoRA")
    config["lora"]["rank"] = 64
    path = save_user_preset("my wan", config, "rank 64")
    assert path.parent == user_preset_dir()
    assert not str(path).startswith(str(app_root()))
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert stored["__version"] == migrations.CURRENT_VERSION
    assert stored == {"__version": migrations.CURRENT_VERSION, "__description": "rank 64", **sparse(config)}
    assert load_preset("my wan") == config
    info = [p for p in list_presets() if p.name == "my wan"][0]
    assert not info.bundled and info.description == "rank 64"
    assert [f.name for f in path.parent.iterdir()] == ["my wan.json"]  # no temporary files left
    delete_user_preset("my wan")
    assert not path.exists()


def test_saving_over_a_user_preset_needs_overwrite() -> None:
    save_user_preset("twice", resolve({"batch_size": 3}))
    with pytest.raises(ConfigError, match="exists"):
        save_user_preset("twice", resolve({"batch_size": 4}))
    assert load_preset("twice")["batch_size"] == 3
    save_user_preset("twice", resolve({"batch_size": 4}), overwrite=True)
    assert load_preset("twice")["batch_size"] == 4


def test_a_failed_save_keeps_the_old_file(monkeypatch: pytest.MonkeyPatch) -> None:
    save_user_preset("keep", resolve({"batch_size": 3}))
    path = user_preset_dir() / "keep.json"
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_user_preset("keep", resolve({"batch_size": 5}), overwrite=True)
    assert path.read_bytes() == before
    assert [f.name for f in path.parent.iterdir()] == ["keep.json"]


@pytest.mark.parametrize("name", ["#mine", "", "a/b", "x:y"])
def test_bad_user_preset_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        save_user_preset(name, resolve())


def test_a_hash_named_file_in_the_user_folder_does_not_shadow_bundled_ones() -> None:
    folder = user_preset_dir()
    folder.mkdir(parents=True)
    (folder / "#wan 2.2 LoRA.json").write_text('{"batch_size": 7}', encoding="utf-8")
    assert load_preset("#wan 2.2 LoRA")["batch_size"] == 2
    assert [p.name for p in list_presets()].count("#wan 2.2 LoRA") == 1


BAD_FILES = {
    "invalid json": ('{"batch_size": 2,,}', None, "line 1, column 18"),
    "unknown key": ('{"batch_sise": 2}', "batch_sise", "did you mean batch_size"),
    "nested unknown key": ('{"video_config": {"max_frame": 8}}', "video_config.max_frame", "video_config.max_frames"),
    "wrong type": ('{"lora": {"rank": "big"}}', "lora.rank", "an integer from 1 to 1024"),
    "out of range": ('{"video_config": {"frame_dropout_probability": 0.9}}', "video_config.frame_dropout_probability", "from 0 to 0.3"),
    "bad choice": ('{"optimizer": "ADAM"}', "optimizer", "one of ADAMW, ADAMW_8BIT, ADAFACTOR, PRODIGY, SGD"),
    "newer version": ('{"__version": 99, "batch_size": 2}', "__version", "newer Video Trainer"),
    "not an object": ("[1, 2]", None, "JSON object"),
    "not utf-8": (b'{"base_model": "\xff\xfe"}', None, "UTF-8"),
    "cross-field": ('{"frames": 40}', "frames", "video_config.max_frames"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_preset_files_give_one_message_naming_file_and_key(kind: str, tmp_path: Path) -> None:
    content, key, words = BAD_FILES[kind]
    path = tmp_path / f"{kind}.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    with pytest.raises(ConfigError) as info:
        load_preset(str(path))
    message = str(info.value)
    assert str(path) in message and words in message and "\n" not in message
    if key:
        assert key in message
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before  # a failed load never writes


def test_a_broken_user_preset_is_listed_with_its_reason() -> None:
    folder = user_preset_dir()
    folder.mkdir(parents=True)
    (folder / "broken.json").write_text('{"lora": {"rank": 0}}', encoding="utf-8")
    info = [p for p in list_presets() if p.name == "broken"][0]
    assert info.error and "lora.rank" in info.error


def test_older_versions_migrate_in_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A future format 2 renamed 'resolution' to 'train_resolution'; reading a version-1 file must
    # run the 1 -> 2 migration and never rewrite the file.
    def rename_resolution(data: dict) -> dict:
        data = dict(data)
        if "resolution" in data:
            data["frames_and_size"] = {"side": data.pop("resolution")}
        return data

    def back_to_schema(data: dict) -> dict:
        data = dict(data)
        if "frames_and_size" in data:
            data["resolution"] = data.pop("frames_and_size")["side"] * 2
        return data

    monkeypatch.setattr(migrations, "CURRENT_VERSION", 3)
    monkeypatch.setattr(migrations, "MIGRATIONS", {1: rename_resolution, 2: back_to_schema})
    old = tmp_path / "old.json"
    old.write_text('{"__version": 1, "resolution": 300}', encoding="utf-8")
    before = old.read_bytes()
    overlay, _ = read_config_file(old)
    assert overlay == {"resolution": 600}
    assert old.read_bytes() == before
    unversioned = tmp_path / "seed.json"
    unversioned.write_text('{"resolution": 100}', encoding="utf-8")
    assert read_config_file(unversioned)[0] == {"resolution": 200}


def test_relative_paths_are_read_against_the_files_folder(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    path = tmp_path / "cfg.json"
    write_config_file(
        path,
        {"base_model": "model", "datasets": [{"path": "clips"}], "cache_dir": "~/cache", "validation": {"folder": ""}},
    )
    overlay, _ = read_config_file(path)
    assert overlay["base_model"] == str(tmp_path / "model")
    assert overlay["datasets"][0]["path"] == str(tmp_path / "clips")
    assert overlay["cache_dir"] == "~/cache"
    (tmp_path / "missing.json").write_text('{"base_model": "../not-yet/built"}', encoding="utf-8")
    assert read_config_file(tmp_path / "missing.json")[0]["base_model"] == str(tmp_path.parent / "not-yet" / "built")
    hub = tmp_path / "hub.json"
    hub.write_text('{"base_model": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}', encoding="utf-8")
    assert read_config_file(hub)[0]["base_model"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def test_unknown_preset_names_list_the_presets() -> None:
    with pytest.raises(ConfigError, match="#wan 2.2 LoRA 8GB"):
        find_preset("#wan 3 LoRA")
