"""The window's View, Tools and Help menus: the theme (gui/theme.py), TensorBoard, the sample window
(gui/sample_window.py), the output and workspace folders, the docs, the log file and the versions.
Thin: what they open comes from core (the server: core/train/tensorboard_server.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PySide6.QtCore import QUrl
from PySide6.QtGui import QAction, QActionGroup, QDesktopServices
from PySide6.QtWidgets import QApplication, QMainWindow, QMenu, QMessageBox

from core.log_setup import log_file_path
from core.paths import app_root

from .background import BackgroundJob, JobControl
from .theme import THEME_KEY, THEME_LABELS, THEMES, Theme
from .window_state import window_settings

log = logging.getLogger(__name__)

# What About lists, by distribution name: read from the installed metadata, nothing is imported.
VERSIONS = ("torch", "diffusers", "transformers", "peft", "accelerate", "optimum-quanto", "bitsandbytes", "PySide6-Essentials")


def open_url(url: QUrl) -> bool:
    """The desktop's browser or file manager (tests replace it)."""
    return QDesktopServices.openUrl(url)


def _start_tensorboard(workspace: Path, control: JobControl) -> Any:
    from core.train.tensorboard_server import start_tensorboard  # on the worker thread

    return start_tensorboard(workspace)


def nearest_existing(path: Path) -> Path:
    """path, or the nearest folder above it that exists (what a file manager can open now)."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return Path.home()


def versions() -> str:
    import importlib.metadata  # here: importing it costs about 30 ms, before the window's first paint
    import platform

    lines = [f"Python {platform.python_version()} on {platform.system()} {platform.machine()}"]
    for name in VERSIONS:
        try:
            lines.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{name}: not installed")
    return "\n".join(lines)


class AppMenus:
    """Builds the menus on `window` (which has .config and a status bar) and owns the TensorBoard
    servers it starts: one per workspace, ended by close()."""

    def __init__(self, window: QMainWindow) -> None:
        self.window = window
        self.servers: dict[Path, Any] = {}  # workspace -> TensorBoardServer
        self._job = BackgroundJob(_start_tensorboard, 0, "TensorBoard", window)
        self._job.finished_ok.connect(self._tensorboard_started)
        self._job.failed.connect(self._tensorboard_failed)
        bar = window.menuBar()
        self._add_view_menu(bar.addMenu("&View"))
        tools = bar.addMenu("&Tools")
        self.tensorboard_action = tools.addAction("Open &TensorBoard", self.open_tensorboard)
        self.tensorboard_action.setToolTip("TensorBoard on this workspace's curves, served on this machine only")
        self.sample_action = tools.addAction("&Sample...", self.open_sample_window)
        self.sample_action.setToolTip("One sample with its own prompt, seed, size and frames: queued during a run, "
                                      "made with the newest weights between runs")
        self.sample_window: Any = None  # gui.sample_window.SampleWindow, made when first opened
        tools.addSeparator()
        tools.addAction("Open &output folder", self.open_output_folder)
        tools.addAction("Open &workspace folder", self.open_workspace_folder)
        help_menu = bar.addMenu("&Help")
        help_menu.addAction("&Documentation", self.open_docs)
        help_menu.addAction("&Log file", self.open_log)
        help_menu.addAction("&About Video Trainer", self.about)

    def _add_view_menu(self, view: QMenu) -> None:
        """View > Theme: System, Light, Dark (gui/theme.py), kept in window.ini by a window that remembers."""
        remember = bool(getattr(self.window, "remember", False))
        mode = str(window_settings().value(THEME_KEY, "SYSTEM")) if remember else "SYSTEM"
        app = QApplication.instance()
        assert isinstance(app, QApplication)
        self.theme = Theme(app, mode, self.window)
        themes = view.addMenu("&Theme")
        group = QActionGroup(themes)
        self.theme_actions: dict[str, QAction] = {}
        for name in THEMES:
            action = themes.addAction(THEME_LABELS[name])
            action.setCheckable(True)
            action.setChecked(name == self.theme.mode)
            group.addAction(action)
            action.triggered.connect(lambda _checked=False, name=name: self.choose_theme(name))
            self.theme_actions[name] = action

    def choose_theme(self, mode: str) -> None:
        self.theme.choose(mode)
        self.theme_actions[mode].setChecked(True)
        if getattr(self.window, "remember", False):
            window_settings().setValue(THEME_KEY, mode)

    def _config(self) -> dict[str, Any]:
        return self.window.config  # type: ignore[attr-defined]

    def _say(self, message: str) -> None:
        self.window.statusBar().showMessage(message, 10_000)

    def _open_folder(self, folder: Path, what: str) -> None:
        shown = nearest_existing(folder)
        if shown != folder:
            self._say(f"{what} {folder} does not exist yet; opened {shown}")
        open_url(QUrl.fromLocalFile(str(shown)))

    # -- Tools ----------------------------------------------------------------------------------
    def open_tensorboard(self) -> None:
        workspace = Path(str(self._config()["workspace_dir"])).expanduser()
        server = self.servers.get(workspace)
        if server is not None and server.running():
            open_url(QUrl(server.url))
            return
        self._say(f"Starting TensorBoard on {workspace}…")
        self._job.request(workspace, now=True)

    def _tensorboard_started(self, workspace: Path, server: Any) -> None:
        old = self.servers.pop(workspace, None)
        if old is not None:
            old.stop()
        self.servers[workspace] = server
        self._say(f"TensorBoard: {server.url} (ends with the window)")
        open_url(QUrl(server.url))

    def _tensorboard_failed(self, workspace: Path, message: str) -> None:
        self._say(message)
        QMessageBox.warning(self.window, "TensorBoard", message)

    def open_sample_window(self) -> None:
        if self.sample_window is None:
            from .sample_window import SampleWindow  # its module only when first wanted

            self.sample_window = SampleWindow(self.window, self.window)  # type: ignore[arg-type]
        self.sample_window.show()
        self.sample_window.raise_()
        self.sample_window.activateWindow()

    def open_output_folder(self) -> None:
        config = self._config()
        output = Path(str(config["output_path"])).expanduser()
        # A LoRA or an embedding is a file: its folder; a fine-tune's output is the folder itself.
        self._open_folder(output if config["training_method"] == "FINE_TUNE" else output.parent, "The output folder")

    def open_workspace_folder(self) -> None:
        self._open_folder(Path(str(self._config()["workspace_dir"])).expanduser(), "The workspace")

    # -- Help -----------------------------------------------------------------------------------
    def open_docs(self) -> None:
        docs = app_root() / "docs"
        open_url(QUrl.fromLocalFile(str(docs if docs.is_dir() else app_root())))

    def open_log(self) -> None:
        path = log_file_path()
        open_url(QUrl.fromLocalFile(str(path if path.is_file() else nearest_existing(path.parent))))

    def about(self) -> None:
        QMessageBox.about(self.window, "About Video Trainer",
                          f"Video Trainer: train video diffusion models on your own clips.\n\n{versions()}\n\n"
                          f"Log file: {log_file_path()}")

    def close(self) -> None:
        """End the TensorBoard servers this window started; a start under way is waited for first,
        so its server is ended too rather than left running."""
        if self._job.is_busy():
            self._job.wait(90_000)
        if self.sample_window is not None:
            self.sample_window.shutdown()
        for server in self.servers.values():
            server.stop()
        self.servers.clear()
