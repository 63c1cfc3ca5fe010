"""The VRAM estimate beside the Model tab: computed off the GUI thread, following the memory settings,
errors as a quiet line, the GPU's capacity only once the engine is loaded."""

from __future__ import annotations

import threading

import pytest

from core.config import load_preset
from core.memory.estimate import GIB, estimate_memory
from gui import estimate_panel
from gui.config_state import ConfigState
from gui.estimate_panel import EstimatePanel, gib
from gui.main_window import MainWindow

PRESET_8GB = "#wan 2.2 LoRA 8GB"


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread of every estimate the panel makes."""
    seen: list[int] = []

    def counting(config, configs=None):
        seen.append(threading.get_ident())
        return estimate_memory(config, configs)

    monkeypatch.setattr(estimate_panel, "estimate_memory", counting)
    monkeypatch.setattr(estimate_panel, "DEBOUNCE_MS", 30)
    return seen


@pytest.fixture
def panel(qtbot, threads: list[int]) -> EstimatePanel:
    """The panel alone, bound to the 8 GB preset's settings (the window's wiring has its own test)."""
    state = ConfigState()
    state.replace(load_preset(PRESET_8GB))
    widget = EstimatePanel(state)
    qtbot.addWidget(widget)
    widget.show()
    assert widget.settle()
    yield widget
    widget.shutdown()


def test_shows_the_estimate_of_the_settings(panel: EstimatePanel, threads: list[int]) -> None:
    expected = estimate_memory(panel.state.config)
    assert panel.estimate is not None and panel.estimate.peak_bytes == expected.peak_bytes
    assert panel.peak_label.text() == gib(expected.peak_bytes)
    assert gib(expected.needed_bytes) in panel.needed_label.text()
    for key, (_name, value, bar, note) in panel.part_rows.items():
        assert value.text() == gib(expected.parts[key]) and not value.isHidden()
        assert 0 <= bar.value() <= 1000 and note.text()
    assert "FLOAT_8" in panel.part_rows["weights"][3].text()
    assert "Wan 2.2 TI2V-5B" in panel.model_label.text()
    assert threads and threading.get_ident() not in threads  # never on the GUI thread


def test_follows_the_memory_settings_in_the_model_tab(qtbot, threads: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    window = MainWindow()
    qtbot.addWidget(window)
    window.load(PRESET_8GB)
    window.show()
    window.select_tab("model")
    panel = window.estimate_panel
    assert panel.isVisible() and window.tabs.currentWidget().isAncestorOf(panel)
    assert panel.settle()
    before, count = panel.estimate.peak_bytes, len(threads)
    window.forms["model"].fields["transformer.weight_dtype"].editor.setCurrentText("BFLOAT_16")
    offload = window.forms["model"].fields["layer_offload_fraction"].editor
    offload.selectAll()
    qtbot.keyClicks(offload, "0")  # typed right after: one estimate for both edits
    assert panel.settle()
    assert window.config["transformer"]["weight_dtype"] == "BFLOAT_16" and window.config["layer_offload_fraction"] == 0
    assert panel.estimate.peak_bytes == estimate_memory(window.config).peak_bytes > before
    assert count < len(threads) <= count + 2  # debounced: not one per keystroke or signal

    # The GPU's capacity is asked for once the engine's background import has ended, not before.
    calls: list[int] = []
    monkeypatch.setattr(estimate_panel, "detect_vram", lambda: calls.append(threading.get_ident()) or (6 * GIB, "Fake GPU"))
    assert "once the training engine has loaded" in panel.gpu_label.text() and calls == []
    window.run_panel.engine_ready.emit()  # as when EngineWarmUp ends
    assert panel.settle()
    assert calls and threading.get_ident() not in calls and "Fake GPU" in panel.gpu_label.text()


def test_unknown_model_is_a_quiet_line(panel: EstimatePanel, monkeypatch: pytest.MonkeyPatch) -> None:
    from PySide6.QtWidgets import QMessageBox

    dialogs: list[str] = []
    monkeypatch.setattr(QMessageBox, "exec", lambda box: dialogs.append(box.text()) or 0)
    panel.state.edit("base_model", "someone/not-downloaded-model")
    assert panel.settle()
    assert panel.estimate is None and "No estimate" in panel.error_label.text()
    assert "not-downloaded-model" in panel.error_label.text() and not panel.error_label.isHidden()
    assert panel.peak_label.text() == "-" and dialogs == []
    panel.state.edit("base_model", load_preset(PRESET_8GB)["base_model"])
    assert panel.settle() and panel.estimate is not None and panel.error_label.isHidden()


def test_gpu_capacity_and_whether_it_fits(panel: EstimatePanel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    fake = (6 * GIB, "Fake GPU")
    monkeypatch.setattr(estimate_panel, "detect_vram", lambda: calls.append(threading.get_ident()) or fake)
    panel.engine_loaded()
    assert panel.settle()
    assert calls and threading.get_ident() not in calls
    assert "Fake GPU" in panel.gpu_label.text() and "6.0 GiB" in panel.gpu_label.text()
    fits = panel.estimate.fits(fake[0])
    assert ("does not fit" not in panel.gpu_label.text()) == fits

    panel.state.edit("transformer.weight_dtype", "FLOAT_32")
    assert panel.settle() and "does not fit" in panel.gpu_label.text()  # 5B parameters in float32
    assert len(calls) == 1  # the GPU is asked once


def test_no_gpu_says_so(panel: EstimatePanel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(estimate_panel, "detect_vram", lambda: None)
    panel.engine_loaded()
    assert panel.settle()
    assert "No CUDA GPU" in panel.gpu_label.text()


def test_small_values_in_mib() -> None:
    assert gib(3 * GIB // 2) == "1.50 GiB"
    assert gib(5 * 2**20) == "5.0 MiB"


def test_shows_the_families_parts_with_both_hunyuan_text_encoders(qtbot, threads: list[int]) -> None:
    """Every part the run loads, from the family's own configs: Hunyuan Video's Llama and CLIP-L text
    encoders (not a T5), each in its section's weight_dtype, and the caching phase's figure."""
    state = ConfigState()
    config = load_preset("#hunyuan video LoRA")
    config["text_encoder"]["weight_dtype"] = "FLOAT_8"
    state.replace(config)
    widget = EstimatePanel(state)
    qtbot.addWidget(widget)
    widget.show()
    try:
        assert widget.settle() and widget.estimate is not None
        parts = {p["name"]: p for p in widget.estimate.details["parts"]}
        assert list(widget.model_part_labels) == ["transformer", "text_encoder", "text_encoder_2", "vae"]
        llama = widget.model_part_labels["text_encoder"][1]
        clip = widget.model_part_labels["text_encoder_2"][1]
        assert llama.isVisible() and clip.isVisible()
        assert llama.text() == f"llama, FLOAT_8: {gib(parts['text_encoder']['bytes'])}, caching only"
        assert clip.text() == f"clip_text_model, BFLOAT_16: {gib(parts['text_encoder_2']['bytes'])}, caching only"
        # FLOAT_8 stores the Llama's block Linears in a byte each: about half its bfloat16 size.
        assert 7 * GIB < parts["text_encoder"]["bytes"] < 8.5 * GIB
        assert "HunyuanVideoTransformer3DModel, FLOAT_8" in widget.model_part_labels["transformer"][1].text()
        assert "Filling the caches" in widget.caching_label.text() and "(tiled)" in widget.caching_label.text()
        assert gib(widget.estimate.caching_needed_bytes) in widget.caching_label.text()
    finally:
        widget.shutdown()
