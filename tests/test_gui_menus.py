"""The Tools and Help menus: TensorBoard answers on localhost, folders and docs open, About lists versions."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QUrl

import gui.menus as menus_module
from gui.main_window import MainWindow


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[QUrl]:
    urls: list[QUrl] = []
    monkeypatch.setattr(menus_module, "open_url", lambda url: urls.append(url) or True)
    return urls


@pytest.fixture
def window(qtbot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201 - pytest-qt's fixture
    # A modal question would block the test: unsaved changes are discarded when it closes.
    monkeypatch.setattr(menus_module.QMessageBox, "question", lambda *a, **k: menus_module.QMessageBox.StandardButton.Discard)
    monkeypatch.setattr(menus_module.QMessageBox, "warning", lambda *a, **k: menus_module.QMessageBox.StandardButton.Ok)
    win = MainWindow(remember=False)
    qtbot.addWidget(win)
    win.state.edit("workspace_dir", str(tmp_path / "workspace"))
    return win


def _action(window: MainWindow, text: str):  # noqa: ANN202
    for menu_action in window.menuBar().actions():
        for action in menu_action.menu().actions():
            if action.text().replace("&", "") == text:
                return action
    raise AssertionError(f"no menu action {text!r}")


def test_open_tensorboard_starts_a_server_that_answers_on_localhost(window: MainWindow, opened: list[QUrl]) -> None:
    _action(window, "Open TensorBoard").trigger()
    assert window.menus._job.wait(90_000)
    (url,) = [u.toString() for u in opened]
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as response:  # the server answers
        assert response.status == 200
    server = window.menus.servers[Path(window.config["workspace_dir"]).expanduser()]
    _action(window, "Open TensorBoard").trigger()  # again: the same server, opened at once
    assert [u.toString() for u in opened] == [url, url]
    window.menus.close()  # what closing the window does: the server ends
    assert not server.running()


def test_folders_docs_log_and_about(window: MainWindow, opened: list[QUrl], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    window.state.edit("output_path", str(tmp_path / "out" / "lora.safetensors"))
    _action(window, "Open output folder").trigger()
    # The folder does not exist yet: its nearest existing parent opens, and the status bar says so.
    assert opened[-1].toLocalFile() == str(tmp_path)
    assert "does not exist yet" in window.statusBar().currentMessage()
    (tmp_path / "out").mkdir()
    _action(window, "Open output folder").trigger()
    assert opened[-1].toLocalFile() == str(tmp_path / "out")
    _action(window, "Documentation").trigger()
    assert opened[-1].toLocalFile().endswith("docs")
    _action(window, "Log file").trigger()
    assert opened[-1].isLocalFile()
    shown: list[str] = []
    monkeypatch.setattr(menus_module.QMessageBox, "about", lambda parent, title, text: shown.append(text))
    _action(window, "About Video Trainer").trigger()
    assert "Python" in shown[0] and "diffusers" in shown[0] and "torch" in shown[0]
