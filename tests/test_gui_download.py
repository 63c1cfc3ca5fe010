"""A hub id as base model: Start downloads it first, with its bytes on the run panel's progress bar;
offline, the start check says so in one line. Nothing is downloaded: huggingface_hub's
snapshot_download is replaced by a fake that reports its bytes the way the real one does (through
the tqdm_class it is given) and hands out the bundled tiny model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import huggingface_hub  # noqa: E402
from huggingface_hub import constants  # noqa: E402
from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: E402

from core.config.presets import DEMO_PRESET, load_preset  # noqa: E402
from core.model_folder import hub_download_needed, resolve_model_folder  # noqa: E402
from gui.run_panel import RunPanel  # noqa: E402
from gui.train_worker import TrainThread  # noqa: E402

HUB_ID = "some-org/tiny-model"
TOTAL = 2_400_000_000


class FakeHub:
    """snapshot_download as far as resolve_model_folder uses it."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.downloaded, self.calls = folder, False, []

    def __call__(self, repo_id: str, *, local_files_only: bool = False, allow_patterns: Any = None,
                 tqdm_class: Any = None, **_: Any) -> str:
        self.calls.append((repo_id, local_files_only))
        if local_files_only and not self.downloaded:
            raise LocalEntryNotFoundError(f"{repo_id} is not in the cache")
        if not local_files_only:
            assert tqdm_class is not None
            files = tqdm_class(range(3), desc="Fetching 3 files")  # counted in files: not reported
            files.update(1)
            bar = tqdm_class(total=0, initial=0, unit="B", desc="Reconstructing")
            bar.total = TOTAL  # grown by each file as it starts, as snapshot_download does
            for _ in range(4):
                bar.update(TOTAL // 4)
            self.downloaded = True
        return str(self.folder)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub(Path(load_preset(DEMO_PRESET)["base_model"]))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return fake


def test_a_hub_id_not_in_the_cache_needs_a_download_and_reports_its_bytes(hub: FakeHub) -> None:
    assert hub_download_needed(HUB_ID) and not hub.downloaded
    seen: list[tuple[int, int | None]] = []
    folder = resolve_model_folder(HUB_ID, progress=lambda done, total: seen.append((done, total)))
    assert folder == hub.folder and hub.downloaded
    assert seen[-1] == (TOTAL, TOTAL) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert not hub_download_needed(HUB_ID)  # in the cache now


def test_offline_nothing_is_tried(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not hub_download_needed(HUB_ID)
    assert all(local for _, local in hub.calls)


def test_the_run_downloads_first_and_the_panel_shows_the_bytes(qtbot, hub: FakeHub) -> None:
    config = load_preset(DEMO_PRESET)
    config["base_model"] = HUB_ID
    thread = TrainThread(config)
    reports: list[tuple[str, int, int | None]] = []
    thread.download.connect(lambda name, done, total: reports.append((name, done, total)))
    thread._download_model()  # what run() does first, before the engine is imported
    assert hub.downloaded and reports[0] == (HUB_ID, 0, None)
    assert reports[-1][1] == reports[-1][2] and "download" in thread.engine_calls

    panel = RunPanel(lambda: config, lambda: [])
    qtbot.addWidget(panel)
    panel._on_download(HUB_ID, 0, None)
    assert panel.progress.maximum() == 0 and HUB_ID in panel.progress.format()
    panel._on_download(HUB_ID, TOTAL // 4, TOTAL)
    assert panel.progress.value() == panel.progress.maximum() // 4
    assert "600 MB of 2.40 GB (25%)" in panel.progress.format()
    assert "Downloading the base model" in panel.status_label.text()
    panel._on_download(HUB_ID, TOTAL, TOTAL)
    assert panel.progress.maximum() == 0 and panel.progress.format() == "preparing"
    assert f"Downloaded {HUB_ID}." in panel.log_view.toPlainText()
