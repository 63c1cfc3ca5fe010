"""The dataset doctor beside the Data tab: the report off the GUI thread, the gauge following the plan
settings without probing again, broken files with their reasons, debounced re-runs."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
from media_factory import make_clip, make_corrupt, make_image

from core.config import load_preset
from core.data.doctor import CONSERVATIVE, RISKY, diagnose
from gui import doctor_panel
from gui.config_state import ConfigState
from gui.doctor_panel import DoctorPanel
from gui.doctor_plan import probe_inputs, replan
from gui.exposure_gauge import rating_colour
from gui.main_window import MainWindow

PRESET = "#demo tiny wan LoRA"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three clips of two shapes, an image, a broken clip (with a caption) and a clip without one."""
    folder = tmp_path_factory.mktemp("doctor-data")
    for name, (w, h) in {"a": (96, 64), "b": (96, 64), "c": (64, 96)}.items():
        make_clip(folder / f"{name}.mp4", width=w, height=h, fps=16, seconds=1.2)
        (folder / f"{name}.txt").write_text(f"clip {name}", encoding="utf-8")
    make_image(folder / "still.png")
    (folder / "still.txt").write_text("a still", encoding="utf-8")
    make_corrupt(folder / "broken.mp4")
    (folder / "broken.txt").write_text("broken", encoding="utf-8")
    make_clip(folder / "nocaption.mp4", fps=16, seconds=1.0)
    return folder


def config_for(folder: Path, **changes: object) -> dict:
    config = copy.deepcopy(load_preset(PRESET))
    config["datasets"] = [{"path": str(folder), "repeats": 1}]
    config.update(changes)
    return config


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread of every diagnose() the panel makes."""
    threads: list[int] = []

    def counting(config, progress=None):
        threads.append(threading.get_ident())
        return diagnose(config, progress)

    monkeypatch.setattr(doctor_panel, "diagnose", counting)
    monkeypatch.setattr(doctor_panel, "DEBOUNCE_MS", 50)
    return threads


@pytest.fixture
def window(qtbot, counted: list[int], dataset: Path) -> MainWindow:
    win = MainWindow()
    qtbot.addWidget(win)
    win.state.replace(config_for(dataset))
    win.show()
    win.select_tab("data")
    assert win.doctor_panel.settle()
    return win


# -- the arithmetic without Qt -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"max_steps": 4000},
        {"batch_size": 2, "gradient_accumulation_steps": 3},
        {"stop_after": "EPOCHS", "epochs": 7},
        {"repeats": 5},
        {"video_config.video_batch_size_multiplier": 3.0},
    ],
)
def test_replan_agrees_with_diagnose(dataset: Path, changes: dict) -> None:
    before = config_for(dataset, max_steps=100)
    after = copy.deepcopy(before)
    for key, value in changes.items():
        if key == "repeats":
            after["datasets"][0]["repeats"] = value
        elif key.startswith("video_config."):
            after["video_config"][key.split(".", 1)[1]] = value
        else:
            after[key] = value
    assert probe_inputs(before) == probe_inputs(after)  # these changes need no probing
    expected, got = diagnose(after), replan(diagnose(before), after)
    assert got.datasets == expected.datasets
    assert got.buckets == expected.buckets
    assert (got.batches_per_pass, got.total_batches, got.optimizer_steps) == (
        expected.batches_per_pass, expected.total_batches, expected.optimizer_steps)
    assert got.settings == expected.settings


def test_probe_inputs_ignore_settings_the_doctor_does_not_read(dataset: Path) -> None:
    config = config_for(dataset)
    other = copy.deepcopy(config)
    other["learning_rate"] = 0.5
    other["lora"]["rank"] = 64
    assert probe_inputs(config) == probe_inputs(other)
    other["resolution"] = 128
    assert probe_inputs(config) != probe_inputs(other)


# -- the panel ----------------------------------------------------------------------------------------


def test_report_counts_buckets_and_broken_files(window: MainWindow, counted: list[int]) -> None:
    panel = window.doctor_panel
    report = panel.shown_report
    assert report is not None and report.clips == 3 and report.images == 1
    assert counted and threading.get_ident() not in counted  # probed on a worker thread
    assert "Ready: 4 items can train" in panel.result_label.text()
    assert "3 usable clips" in panel.media_label.text() and "1 broken file" in panel.media_label.text()
    assert panel.buckets_table.rowCount() == len(report.buckets) >= 2
    problems = {panel.problems_table.item(r, 0).text(): panel.problems_table.item(r, 1).text() for r in range(panel.problems_table.rowCount())}
    assert problems.get("broken.mp4")  # listed, with its reason
    assert any(name.startswith("nocaption") for name in problems)
    assert not panel.problems_table.isHidden() and "left out" in panel.problems_title.text()


def test_gauge_follows_steps_and_repeats_without_probing(window: MainWindow, counted: list[int], qtbot) -> None:
    panel = window.doctor_panel
    probes = len(counted)
    name, gauge, verdict, _hint = panel.gauge_rows[0]
    assert name.text() == Path(window.config["datasets"][0]["path"]).name
    start = gauge.times_seen
    assert start is not None and start > 0

    window.forms["training"].fields["max_steps"].editor.setValue(window.config["max_steps"] * 100)
    assert gauge.times_seen == pytest.approx(start * 100)  # at once: replanned, not probed
    assert panel.shown_report.datasets[0].rating == RISKY
    assert RISKY in verdict.text() and rating_colour(RISKY).name() in verdict.text()
    assert "likely to overfit" in panel.gauge_rows[0][3].text()

    window.forms["training"].fields["max_steps"].editor.setValue(1)
    window.forms["data"].fields["datasets"].editor.cellWidget(0, 1).setValue(2)  # repeats
    assert panel.shown_report.datasets[0].rating == CONSERVATIVE
    qtbot.wait(150)  # past the debounce: still nothing probed
    assert len(counted) == probes and not panel.job.is_busy()


def test_edits_that_need_probing_are_debounced_into_one_run(window: MainWindow, counted: list[int]) -> None:
    panel = window.doctor_panel
    probes = len(counted)
    resolution = window.forms["data"].fields["resolution"].editor
    for value in (80, 96, 112, 128):  # typing
        resolution.setValue(value)
    assert panel.job.is_busy()
    assert panel.settle()
    assert len(counted) == probes + 1
    assert panel.shown_report.settings["resolution"] == 128


def test_panel_works_only_while_shown(qtbot, counted: list[int], dataset: Path) -> None:
    win = MainWindow()
    qtbot.addWidget(win)
    win.show()
    win.select_tab("general")
    win.state.replace(config_for(dataset))
    qtbot.wait(120)
    assert counted == []  # the Data tab was not looked at: nothing probed
    win.select_tab("data")
    assert win.doctor_panel.settle() and len(counted) == 1


def test_no_dataset_is_a_hint_not_an_error(qtbot, counted: list[int]) -> None:
    panel = DoctorPanel(ConfigState())
    qtbot.addWidget(panel)
    panel.show()
    assert panel.settle()
    assert "Add a folder" in panel.status_label.text()
    assert panel.result_label.text() == "" and panel.problems_table.isHidden()
    panel.shutdown()


def test_gauge_colours_follow_the_rating() -> None:
    from core.data import doctor
    from gui import exposure_gauge

    names = (doctor.CONSERVATIVE, doctor.MODERATE, doctor.HIGH, doctor.RISKY)
    assert names == (exposure_gauge.CONSERVATIVE, exposure_gauge.MODERATE, exposure_gauge.HIGH, exposure_gauge.RISKY)
    assert len({rating_colour(r).name() for r in names}) == 4
