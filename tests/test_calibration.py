"""The estimator reads the calibration file (core/memory/calibration.py): an entry scales the
transformer's activation term by its factor; no file, or no entry, changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import load_preset
from core.memory import calibration
from core.memory.estimate import estimate_memory


@pytest.fixture
def preset() -> dict:
    return load_preset("#wan 2.2 LoRA")


def _write(path: Path, factor: float, mode: str = "ON", cls: str = "WanTransformer3DModel") -> Path:
    path.write_text(json.dumps({"version": 1, "activation_factors": {cls: {mode: {"factor": factor, "cases": 1, "source": "test"}}}}))
    return path


def test_calibration_file_scales_the_activation_term(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset: dict) -> None:
    monkeypatch.setattr(calibration, "CALIBRATION_PATH", tmp_path / "absent.json")
    plain = estimate_memory(preset)
    assert plain.details["activation_factor"] == 1.0
    monkeypatch.setattr(calibration, "CALIBRATION_PATH", _write(tmp_path / "calibration.json", 1.5))
    scaled = estimate_memory(preset)
    assert scaled.details["activation_factor"] == 1.5
    assert scaled.parts["activations"] == int(plain.parts["activations"] * 1.5)
    for part in ("weights", "trainable_state", "workspace"):
        assert scaled.parts[part] == plain.parts[part]
    assert scaled.peak_bytes - plain.peak_bytes == scaled.parts["activations"] - plain.parts["activations"]


def test_no_entry_for_the_mode_or_class_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset: dict) -> None:
    monkeypatch.setattr(calibration, "CALIBRATION_PATH", tmp_path / "absent.json")
    plain = estimate_memory(preset)
    for name, kwargs in (("mode.json", {"mode": "CPU_OFFLOADED"}), ("cls.json", {"cls": "CogVideoXTransformer3DModel"})):
        table = calibration.load_calibration(_write(tmp_path / name, 2.0, **kwargs))
        assert estimate_memory(preset, calibration=table).as_json() == plain.as_json()


def test_calibration_from_results_takes_the_median_per_class_and_mode() -> None:
    rows = [{"status": "ok", "transformer_class": "WanTransformer3DModel", "gradient_checkpointing": "ON", "activation_ratio": r}
            for r in (1.0, 1.2, 3.0)]
    rows.append({"status": "skipped", "transformer_class": "WanTransformer3DModel", "gradient_checkpointing": "ON"})
    made = calibration.calibration_from_results(rows, "test")
    assert made["activation_factors"]["WanTransformer3DModel"]["ON"]["factor"] == 1.2
    assert made["activation_factors"]["WanTransformer3DModel"]["ON"]["cases"] == 3

