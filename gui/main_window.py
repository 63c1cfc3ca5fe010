"""The main window: the preset bar, one tab of settings per entry of gui.tab_layout.TABS, a status
line naming what is wrong with the settings, and below the tabs the run panel and the live plots.

Shortcuts: Ctrl+Return starts a run, Ctrl+. stops it (Esc is not used: it is pressed too easily,
and closes popups), Ctrl+S saves the preset, Ctrl+Shift+S saves it under a new name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, QSettings, Qt
from PySide6.QtGui import QAction, QCloseEvent, QIcon, QKeySequence
from PySide6.QtWidgets import (
    QFrame,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QScrollArea,
    QSplitter,
    QStyle,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from core.config.presets import (
    BUNDLED_PREFIX,
    LoadedPreset,
    check_user_preset_name,
    open_preset,
    save_user_preset,
    user_preset_path,
)
from core.errors import ConfigError
from core.paths import user_state_dir

from .config_state import ConfigState, Problem
from .preset_bar import PresetBar
from .run_area import RunArea
from .settings_form import SettingsForm
from .tab_layout import TABS
from .train_worker import RunOutcome

log = logging.getLogger(__name__)

APP_TITLE = "Video Trainer"
DEFAULT_SIZE = (1120, 800)
STYLE_SHEET = """
QLineEdit[invalid="true"], QPlainTextEdit[invalid="true"], QComboBox[invalid="true"], QTableWidget[invalid="true"] {
    border: 1px solid #d9534f; border-radius: 3px; background-color: #fff4f4; color: #222;
}
QAbstractSpinBox[invalid="true"] { background-color: #ffe3e3; color: #222; }
QCheckBox[invalid="true"] { color: #c9302c; }
QLabel#problems { color: #c9302c; }
QLabel#modified { color: #a15c00; font-style: italic; }
"""


def window_settings() -> QSettings:
    """Window state (geometry, last preset) in the per-user state folder, as an INI file."""
    folder = user_state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return QSettings(str(folder / "window.ini"), QSettings.Format.IniFormat)


class MainWindow(QMainWindow):
    def __init__(self, *, remember: bool = True, parent: QWidget | None = None) -> None:
        """remember: read and write window state (off for --screenshot, which must not change it)."""
        super().__init__(parent)
        self.remember = remember
        self.loaded: LoadedPreset | None = None
        self.state = ConfigState(self)
        self.forms: dict[str, SettingsForm] = {}

        self.preset_bar = PresetBar()
        self.preset_bar.load_requested.connect(self._load_requested)
        self.preset_bar.save_requested.connect(self.save)
        self.preset_bar.save_as_requested.connect(self.save_as)

        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        for spec in TABS:
            form = SettingsForm(spec.entries, self.state)
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QFrame.Shape.NoFrame)
            scroll.setWidget(form)
            self.tabs.addTab(scroll, spec.title)
            self.forms[spec.name] = form

        self._close_when_stopped = False  # the user closed the window during a run and said stop
        # Settings above, the run below: the run panel beside the plots, all resizable.
        self.run_area = RunArea(lambda: self.config, self.invalid_settings)
        self.run_panel, self.plots = self.run_area.panel, self.run_area.plots
        self.run_panel.run_finished.connect(self._run_finished)
        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.addWidget(self.tabs)
        self.splitter.addWidget(self.run_area)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.setSizes([430, 320])

        central = QWidget()
        column = QVBoxLayout(central)
        column.setContentsMargins(0, 0, 0, 0)
        column.setSpacing(0)
        column.addWidget(self.preset_bar)
        column.addWidget(self.splitter, 1)
        self.setCentralWidget(central)
        self._add_shortcuts()

        self.problems_label = QLabel()
        self.problems_label.setObjectName("problems")
        self.statusBar().addWidget(self.problems_label, 1)
        self.setStyleSheet(STYLE_SHEET)

        self.state.edited.connect(self._state_changed)
        self.state.replaced.connect(self._config_replaced)
        self.state.problems_changed.connect(self._show_problems)
        self._config_replaced()
        self.resize(*DEFAULT_SIZE)
        if remember:
            geometry = window_settings().value("geometry")
            if not (isinstance(geometry, QByteArray) and self.restoreGeometry(geometry)):
                fit_and_center(self)
            for key, splitter in (("splitter", self.splitter), ("run_area", self.run_area)):
                state = window_settings().value(key)
                if isinstance(state, QByteArray):
                    splitter.restoreState(state)

    # -- what other parts use ------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        return self.state.config

    def invalid_settings(self) -> list[Problem]:
        """What is wrong with the settings, (key, message) each; a run must not start unless empty."""
        return self.state.problems()

    def select_tab(self, name: str) -> bool:
        """Show the tab of that name (as in gui.launch.TAB_NAMES); False if it is hidden."""
        index = [spec.name for spec in TABS].index(name)
        if not self.tabs.isTabVisible(index):
            return False
        self.tabs.setCurrentIndex(index)
        return True

    def load(self, name_or_file: str) -> None:
        """Load a preset (by name) or a config file (by path) into the window; raises ConfigError."""
        self.apply(open_preset(name_or_file))

    def apply(self, loaded: LoadedPreset) -> None:
        self.loaded = loaded
        self.state.replace(loaded.config)
        self.preset_bar.select(loaded.name if loaded.listed else None)
        log.info("loaded %s", loaded.path)
        if self.remember and loaded.listed:
            window_settings().setValue("last_preset", loaded.name)

    def restore_last_preset(self) -> None:
        """Load the preset loaded last time, if it still loads; else keep the defaults."""
        name = window_settings().value("last_preset")
        if not isinstance(name, str) or not name:
            return
        try:
            self.load(name)
        except ConfigError as e:
            log.warning("last preset not loaded: %s", e)
            self.statusBar().showMessage(f"The last preset, '{name}', could not be loaded: {e}", 15000)

    # -- loading and saving ---------------------------------------------------------------------

    def _load_requested(self, name: str) -> None:
        if not self._confirm_discard():
            self.preset_bar.select(self.loaded.name if self.loaded and self.loaded.listed else None)
            return
        try:
            self.load(name)
        except ConfigError as e:
            QMessageBox.warning(self, "Load preset", str(e))
            self.preset_bar.refresh()

    def save(self) -> bool:
        """Save into the loaded user preset; anything else (bundled, a file, defaults) asks a name."""
        if self.loaded is not None and self.loaded.is_user_preset:
            return self._save_checked(self.loaded.name, self.loaded.description)
        return self.save_as()

    def save_as(self) -> bool:
        """Ask a name for a new user preset and save; False if cancelled or it failed."""
        if not self._check_savable():
            return False
        name = self._suggested_name()
        while True:
            name, ok = QInputDialog.getText(self, "Save preset as", "Name of your preset:", text=name)
            if not ok:
                return False
            try:
                name = check_user_preset_name(name)
            except ConfigError as e:
                QMessageBox.warning(self, "Save preset as", str(e))
                continue
            if user_preset_path(name).exists():
                answer = QMessageBox.question(
                    self,
                    "Save preset as",
                    f"You already have a preset named '{name}'. Replace it?",
                    QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                    QMessageBox.StandardButton.No,
                )
                if answer != QMessageBox.StandardButton.Yes:
                    continue
            break
        source = self.loaded.name if self.loaded is not None else None
        description = f"Based on '{source}'." if source and source != name else (self.loaded.description if self.loaded else "")
        return self._save(name, description)

    def save_to(self, name: str, description: str = "") -> Path:
        """Save as a user preset without asking (for tests and scripts); raises ConfigError."""
        name = check_user_preset_name(name)
        problems = self.invalid_settings()
        if problems:
            raise ConfigError(problems[0].message, key=problems[0].key)
        path = save_user_preset(name, self.config, description, overwrite=True)  # the dialog asked
        self.apply(LoadedPreset(self.config, name, path, description))
        self.preset_bar.refresh(select=name)
        return path

    def _save_checked(self, name: str, description: str) -> bool:
        return self._check_savable() and self._save(name, description)

    def _save(self, name: str, description: str) -> bool:
        try:
            self.save_to(name, description)
        except (ConfigError, OSError) as e:
            QMessageBox.warning(self, "Save preset", f"The preset could not be saved: {e}")
            return False
        self.statusBar().showMessage(f"Saved preset '{name}'.", 5000)
        return True

    def _check_savable(self) -> bool:
        # A preset with a broken setting would not load again; say what to fix instead.
        problems = self.invalid_settings()
        if problems:
            QMessageBox.warning(self, "Save preset", "Fix these settings first:\n\n" + "\n".join(p.message for p in problems))
        return not problems

    def _suggested_name(self) -> str:
        if self.loaded is None:
            return ""
        if self.loaded.is_user_preset:
            return self.loaded.name
        return self.loaded.name.removeprefix(BUNDLED_PREFIX).removesuffix(".json") + " (mine)"

    def _confirm_discard(self) -> bool:
        if not self.state.is_modified():
            return True
        answer = QMessageBox.question(
            self,
            APP_TITLE,
            "The settings were changed and not saved. Discard the changes?",
            QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        return answer == QMessageBox.StandardButton.Discard

    # -- reacting to the config ----------------------------------------------------------------

    def _config_replaced(self) -> None:
        for form in self.forms.values():
            form.refresh()
        self._state_changed()

    def _state_changed(self, _key: str = "") -> None:
        for form in self.forms.values():
            form.update_state()
        for index, spec in enumerate(TABS):
            # Tabs of sections that do not apply (LoRA for a fine-tune) go away altogether.
            self.tabs.setTabVisible(index, self.forms[spec.name].applies())
        modified = self.state.is_modified()
        name = self.loaded.name if self.loaded is not None else "Default settings"
        self.setWindowTitle(f"{name}[*] - {APP_TITLE}")
        self.setWindowModified(modified)
        self.preset_bar.set_modified(modified)
        self._show_problems()

    def _show_problems(self) -> None:
        problems = self.invalid_settings()
        self.run_panel.set_problems(problems)
        keys = {p.key for p in problems}
        warning = self.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning)
        for index, spec in enumerate(TABS):
            has_problem = any(key in keys for key in self.forms[spec.name].fields)
            self.tabs.setTabIcon(index, warning if has_problem else QIcon())
        if not problems:
            self.problems_label.setText("")
            self.problems_label.setToolTip("")
            return
        more = f"  (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        self.problems_label.setText(problems[0].message + more)
        self.problems_label.setToolTip("\n".join(p.message for p in problems))

    # -- the run -------------------------------------------------------------------------------

    def _run_finished(self, outcome: RunOutcome) -> None:
        if self._close_when_stopped:
            self.close()
            return
        if outcome.error is not None and outcome.error.keys:
            self.show_setting(outcome.error.keys[0])

    def show_setting(self, key: str) -> bool:
        """Bring the tab holding this setting forward and focus its field; False if none shows it."""
        for index, spec in enumerate(TABS):
            field = self.forms[spec.name].fields.get(key)
            if field is not None and self.tabs.isTabVisible(index):
                self.tabs.setCurrentIndex(index)
                field.editor.setFocus()
                return True
        return False

    # -- desktop manners -----------------------------------------------------------------------

    def _add_shortcuts(self) -> None:
        shortcuts = (
            ("Start training", ("Ctrl+Return", "Ctrl+Enter"), self.run_panel.start),
            ("Stop training", ("Ctrl+.",), self.run_panel.stop),
            ("Save preset", (QKeySequence.StandardKey.Save,), self.save),
            ("Save preset as", ("Ctrl+Shift+S",), self.save_as),
        )
        for text, keys, slot in shortcuts:
            action = QAction(text, self)
            action.setShortcuts([QKeySequence(key) for key in keys])
            action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
            action.triggered.connect(lambda _checked=False, slot=slot: slot())
            self.addAction(action)

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt's name)
        if self.run_panel.is_running():
            event.ignore()
            if self._close_when_stopped:  # already stopping: the window closes when the run ends
                self.statusBar().showMessage("Still stopping: the window closes as soon as the result is saved.", 10000)
                return
            if not self._confirm_discard():
                return
            answer = QMessageBox.question(
                self,
                APP_TITLE,
                "Training is running. Stop it after the current step, save what was trained, and close?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                QMessageBox.StandardButton.No,
            )
            if answer != QMessageBox.StandardButton.Yes:
                return
            self._close_when_stopped = True
            self.run_panel.stop()
            self.statusBar().showMessage("Stopping training: the window closes when the result is saved.")
            return
        # After a stop the user chose to close for, the questions were asked already.
        if not self._close_when_stopped and not self._confirm_discard():
            event.ignore()
            return
        if self.remember:
            settings = window_settings()
            settings.setValue("geometry", self.saveGeometry())
            settings.setValue("splitter", self.splitter.saveState())
            settings.setValue("run_area", self.run_area.saveState())
        if self.run_panel.is_busy():
            self.hide()  # the background import cannot be interrupted: wait for it out of sight
        self.run_panel.shutdown()
        event.accept()


def fit_and_center(window: QMainWindow) -> None:
    """First start: the default size, but no larger than most of a small laptop screen."""
    screen = window.screen().availableGeometry()
    window.resize(min(window.width(), int(screen.width() * 0.9)), min(window.height(), int(screen.height() * 0.9)))
    frame = window.frameGeometry()
    frame.moveCenter(screen.center())
    window.move(frame.topLeft())
