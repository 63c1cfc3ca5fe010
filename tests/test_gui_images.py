"""The window with an image model and image folders: the dataset doctor counts images (its gauge, its
media line, its hints), and the sample viewer shows the PNG samples a HiDream run writes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
from media_factory import make_clip, make_image

from core.config import load_preset, resolve
from gui.config_state import ConfigState
from gui.doctor_panel import DoctorPanel
from gui.sample_viewer import SampleViewer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        make_image(folder / f"{index}.png", width=64, height=64, index=index)
        (folder / f"{index}.txt").write_text(f"square {index}", encoding="utf-8")
    return folder


def _panel(qtbot, config: dict) -> DoctorPanel:
    state = ConfigState()
    state.replace(config)
    panel = DoctorPanel(state)
    qtbot.addWidget(panel)
    panel.show()
    assert panel.settle()
    return panel


def _hidream_config(model: Path, data: Path, **changes) -> dict:
    config = copy.deepcopy(load_preset("#hidream LoRA"))
    config.update(base_model=str(model), datasets=[{"path": str(data), "repeats": 1}], resolution=64, **changes)
    return resolve(config)


def test_the_doctor_counts_images_for_an_image_model(qtbot, tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    data = _images(tmp_path / "images", 3)
    make_clip(data / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (data / "clip.txt").write_text("a moving square", encoding="utf-8")
    panel = _panel(qtbot, _hidream_config(tiny_model("hidream"), data, max_steps=3000))
    report = panel.shown_report
    assert report is not None and report.settings["stills_only"] and report.datasets[0].unit == "image"
    assert report.train_items == 3  # the clip is left out by name, as training leaves it out
    assert panel.gauge_title.text() == "Times each image is seen"
    media = panel.media_label.text()
    assert "3 usable images" in media and "clip" not in media
    _name, gauge, verdict, hint = panel.gauge_rows[0]
    assert gauge.times_seen == pytest.approx(1000) and "risky" in verdict.text()  # 3000 steps over 3 images
    assert "add images" in hint.text() and "clips" not in hint.text()
    assert "3 images to train on" in _name.toolTip()
    problems = [panel.problems_table.item(r, 1).text() for r in range(panel.problems_table.rowCount())]
    assert any("image model" in p for p in problems)
    # The doctor's text report (main.py doctor) says the same.
    from core.data.doctor_text import render_report

    text = render_report(report)
    assert "3 images to train on" in text and "usable: 3 images" in text and "each image seen about 1000 times" in text
    panel.shutdown()


def test_a_folder_of_images_is_counted_as_images_for_a_video_model(qtbot, tmp_path: Path) -> None:
    data = _images(tmp_path / "images", 2)
    config = copy.deepcopy(load_preset("#demo tiny wan LoRA"))
    config["datasets"] = [{"path": str(data), "repeats": 1}]
    panel = _panel(qtbot, config)
    report = panel.shown_report
    assert report is not None and not report.settings["stills_only"] and report.datasets[0].unit == "image"
    assert panel.gauge_title.text() == "Times each image is seen"
    assert "2 usable images" in panel.media_label.text() and "clip" not in panel.media_label.text()
    # A clip beside them: the items are of both kinds again.
    make_clip(data / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (data / "clip.txt").write_text("a moving square", encoding="utf-8")
    panel.check_now()
    assert panel.settle()
    assert panel.gauge_title.text() == "Times each item is seen" and "1 usable clip" in panel.media_label.text()
    panel.shutdown()


def test_the_sample_viewer_shows_a_hidream_runs_png(qtbot, tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    from test_hidream import hd_config

    from core.train.trainer import Trainer

    data = _images(tmp_path / "images", 1)
    config = hd_config(tiny_model("hidream"), data, tmp_path, max_steps=2,
                       sampling={"every_n_steps": 2, "prompts": ["a cat"], "width": 48, "height": 32, "frames": 1,
                                 "inference_steps": 2})
    written: list[str] = []
    from core.train.events import TrainerCallbacks

    class Recording(TrainerCallbacks):
        def on_sample(self, path: Path) -> None:  # what the window's TrainThread relays
            written.append(str(path))

    Trainer(config, Recording()).run()
    (png,) = written
    assert png.endswith(".png")
    state = ConfigState()
    state.replace(config)
    viewer = SampleViewer(state)
    qtbot.addWidget(viewer)
    viewer.show()
    viewer.add_sample(png)
    assert viewer.settle()
    video = viewer.player.video
    assert video is not None and len(video.frames) == 1 and (video.width, video.height) == (48, 32)
    assert not viewer.player.timer.isActive() and not viewer.player.pixmap().isNull()
    assert "still image, 48x32" in viewer.caption.text() and "step 2" in viewer.caption.text()
    assert viewer.list.count() == 1
    viewer.shutdown()


def test_the_estimate_panel_notes_a_kept_llama(qtbot) -> None:
    from core.memory.estimate import estimate_memory
    from gui.estimate_panel import part_notes

    base = {"model_type": "HIDREAM", "base_model": "HiDream-ai/HiDream-I1-Full", "frames": 1}
    kept = estimate_memory(resolve({**base, "text_encoder_4": {"weight_dtype": "NFLOAT_4", "keep_loaded": True}}))
    assert "text_encoder_4 kept loaded (4.33 GiB)" in part_notes(kept)["weights"]
    assert "kept" not in part_notes(estimate_memory(resolve(base)))["weights"]
