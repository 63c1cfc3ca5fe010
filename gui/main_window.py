"""The main window: the preset bar, one tab of settings per entry of gui.tab_layout.TABS, a status
line naming what is wrong with the settings, and below the tabs the run panel and the live plots.
Beside the Data, Model and Sampling tabs' settings: the dataset doctor, the VRAM estimate and the
samples (gui.doctor_panel, gui.estimate_panel, gui.sample_viewer). Loading and saving presets, and
the last settings put back at start-up, are in gui.preset_actions.

Shortcuts: Ctrl+Return starts a run, Ctrl+. stops it (Esc is not used: it is pressed too easily,
and closes popups), Ctrl+S saves the preset, Ctrl+Shift+S saves it under a new name.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QByteArray, QEvent, QObject, Qt, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QIcon, QKeySequence
from PySide6.QtWidgets import (
    QLabel,
    QMainWindow,
    QMessageBox,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from core.config.presets import LoadedPreset
from core.config.settings import applies_key

from .collector import GuiThreadCollector
from .config_state import ConfigState, Problem, messages
from .labels import wrapped_tooltip
from .menus import AppMenus
from .preset_actions import APP_TITLE, PresetActions
from .preset_bar import PresetBar
from .run_area import RunArea
from .side_panel import PROBLEM_COLOUR, SidePanel, set_text_colour
from .start_check import StartCheck
from .tab_layout import TABS
from .tab_pages import LazyForms, TabPages
from .train_worker import RunOutcome
from .window_state import fit_and_center, save_last_settings, window_settings

if TYPE_CHECKING:
    from .dataset_editor import DatasetEditor
    from .doctor_panel import DoctorPanel
    from .estimate_panel import EstimatePanel
    from .plots import TrainingPlots
    from .sample_viewer import SampleViewer

log = logging.getLogger(__name__)

DEFAULT_SIZE = (1120, 800)


class MainWindow(PresetActions, QMainWindow):
    def __init__(self, *, remember: bool = True, parent: QWidget | None = None) -> None:
        """remember: read and write window state (off for --screenshot, which must not change it)."""
        super().__init__(parent)
        # Other threads run Python while the window lives: garbage is collected on this one (gui/collector.py).
        self.collector = GuiThreadCollector(self)
        self.remember = remember
        self.loaded: LoadedPreset | None = None
        self.state = ConfigState(self)
        self._engine_loaded = False  # the engine's background import has ended (the GPU can be asked)

        self.preset_bar = PresetBar()
        self.preset_bar.load_requested.connect(self._load_requested)
        self.preset_bar.save_requested.connect(self.save)
        self.preset_bar.save_as_requested.connect(self.save_as)

        # One tab per group of settings; a tab's page (its form, and beside the Data, Model and
        # Sampling tabs' settings the doctor, the VRAM estimate, the samples) is built when first shown.
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.pages = TabPages(self.tabs, self.state, self._make_side_panel, self._remembered, DEFAULT_SIZE[0], self._make_below)
        self.pages.built_page.connect(self._page_built)
        self.forms = LazyForms(self.pages)

        self._close_when_stopped = False  # the user closed the window during a run and said stop
        # Settings above, the run below: the run panel beside the plots, all resizable.
        self.run_area = RunArea(lambda: self.config, self.start_blockers)
        self.run_panel = self.run_area.panel
        self.run_panel.run_finished.connect(self._run_finished)
        self.run_panel.run_started.connect(self._run_started)
        # What a run would refuse, checked while editing: marks fields and disables Start (gui/start_check.py).
        self.start_check = StartCheck(self.state, self)
        self.run_panel.engine_ready.connect(self._engine_ready)
        self.start_check.request()
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
        set_text_colour(self.problems_label, PROBLEM_COLOUR)
        self.statusBar().addWidget(self.problems_label, 1)
        self.menus = AppMenus(self)

        self.state.edited.connect(self._state_changed)
        self.state.replaced.connect(self._config_replaced)
        self.state.problems_changed.connect(self._show_problems)
        self.pages.build_current()
        self._config_replaced()
        self.resize(*DEFAULT_SIZE)
        if remember:
            geometry = window_settings().value("geometry")
            if not (isinstance(geometry, QByteArray) and self.restoreGeometry(geometry)):
                fit_and_center(self)
            for key, splitter in (("splitter", self.splitter), ("run_area", self.run_area)):
                state = self._remembered(key)
                if state is not None:
                    splitter.restoreState(state)
        self.installEventFilter(self)  # the first paint: then the hidden tabs are built

    # -- the tabs' pages, built when first shown -------------------------------------------------

    def _remembered(self, key: str) -> QByteArray | None:
        """A divider's state from window.ini (None without one, or in a window that does not remember)."""
        if not self.remember:
            return None
        state = window_settings().value(key)
        return state if isinstance(state, QByteArray) else None

    def _make_side_panel(self, name: str) -> SidePanel | None:
        """The panel beside a tab's settings, made with its page (their modules imported then too)."""
        if name == "data":
            from .doctor_panel import DoctorPanel

            doctor = DoctorPanel(self.state)
            doctor.reported.connect(self.start_check.doctor_reported)
            return doctor
        if name == "model":
            from .estimate_panel import EstimatePanel

            estimate = EstimatePanel(self.state)
            if self._engine_loaded:
                estimate.engine_loaded()
            return estimate
        if name == "sampling":
            from .sample_viewer import SampleViewer

            return SampleViewer(self.state)
        return None

    def _make_below(self, name: str) -> QWidget | None:
        """The widget under a tab's settings: the dataset editor on the Data tab, fed by its doctor."""
        if name != "data":
            return None
        from .dataset_editor import DatasetEditor

        from .doctor_panel import DoctorPanel

        editor = DatasetEditor(self.state)
        doctor = self.pages.side_panels.get("data")
        if isinstance(doctor, DoctorPanel):
            doctor.reported.connect(editor.set_report)
            editor.captions_changed.connect(doctor.check_now)
            if doctor.report is not None:
                editor.set_report(None, doctor.report)
        return editor

    def _page_built(self, name: str, page: QWidget) -> None:
        if name == "data":
            from .folder_drops import FolderDrops

            # Folders dropped anywhere on the Data tab become datasets (the editor shows the last).
            self.folder_drops = FolderDrops(page)
            self.folder_drops.dropped.connect(self.dataset_editor.add_folders)

    @property
    def dataset_editor(self) -> DatasetEditor:
        self.pages.form("data")
        return self.pages.below_widgets["data"]  # type: ignore[return-value]

    @property
    def side_panels(self) -> dict[str, SidePanel]:
        """The side panels built so far, by tab."""
        return self.pages.side_panels

    @property
    def side_splitters(self) -> dict[str, QSplitter]:
        return self.pages.side_splitters

    @property
    def doctor_panel(self) -> DoctorPanel:
        return self.pages.panel("data")  # type: ignore[return-value]

    @property
    def estimate_panel(self) -> EstimatePanel:
        return self.pages.panel("model")  # type: ignore[return-value]

    @property
    def sample_viewer(self) -> SampleViewer:
        return self.pages.panel("sampling")  # type: ignore[return-value]

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if watched is self and event.type() == QEvent.Type.Paint:
            self.removeEventFilter(self)
            QTimer.singleShot(0, self, self.pages.build_rest_later)  # once this paint is on the screen
        return False

    def _engine_ready(self) -> None:
        self._engine_loaded = True
        self.start_check.engine_loaded()
        if "model" in self.side_panels:
            self.estimate_panel.engine_loaded()

    # -- what other parts use ------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        return self.state.config

    @property
    def plots(self) -> TrainingPlots:
        """The live plots (built after the window's first paint, or now if asked for before)."""
        return self.run_area.plots

    def invalid_settings(self) -> list[Problem]:
        """What is wrong with the settings, (key, message) each; a preset is not saved unless empty."""
        return self.state.problems()

    def start_blockers(self) -> list[Problem]:
        """invalid_settings() and what the start check found a run would refuse: Start is disabled
        unless empty."""
        return self.state.start_blockers()

    def select_tab(self, name: str) -> bool:
        """Show the tab of that name (as in gui.launch.TAB_NAMES); False if it is hidden."""
        index = [spec.name for spec in TABS].index(name)
        if not self.tabs.isTabVisible(index):
            return False
        self.tabs.setCurrentIndex(index)
        return True

    def settle(self, timeout_ms: int = 30_000) -> None:
        """Let the visible side panel finish its background work (for screenshots and tests)."""
        self.run_area.build_plots()
        self.run_area.settle(timeout_ms)
        self.start_check.settle(timeout_ms)
        page = self.tabs.currentWidget()
        # A copy: settling turns the event loop, which may build the other tabs' pages meanwhile.
        for panel in list(self.side_panels.values()):
            if panel.isVisible() and page.isAncestorOf(panel):
                panel.settle(timeout_ms)
        if "data" in self.pages.below_widgets and self.dataset_editor.isVisible() and page.isAncestorOf(self.dataset_editor):
            self.dataset_editor.settle(timeout_ms)

    # -- reacting to the config ----------------------------------------------------------------

    def _config_replaced(self) -> None:
        for form in self.pages.built.values():
            form.refresh()
        self._state_changed()

    def _state_changed(self, _key: str = "") -> None:
        for form in self.pages.built.values():
            form.update_state()
        config = self.config
        for index, spec in enumerate(TABS):
            # Tabs of sections that do not apply (LoRA for a fine-tune) go away altogether.
            self.tabs.setTabVisible(index, any(applies_key(key, config) for key in self.pages.keys[spec.name]))
        modified = self.state.is_modified()
        name = self.loaded.name if self.loaded is not None else "Default settings"
        self.setWindowTitle(f"{name}[*] - {APP_TITLE}")
        self.setWindowModified(modified)
        self.preset_bar.set_modified(modified)
        self._show_problems()
        self.run_area.settings_changed()  # another workspace_dir: its run's history

    def _show_problems(self) -> None:
        problems = self.start_blockers()
        for form in self.pages.built.values():
            form.show_problems()
        self.run_panel.set_problems(problems)
        keys = {p.key for p in problems}
        for index, spec in enumerate(TABS):
            has_problem = any(key in keys for key in self.pages.keys[spec.name])
            self.tabs.setTabIcon(index, self._warning_icon() if has_problem else QIcon())
        if not problems:
            self.problems_label.setText("")
            self.problems_label.setToolTip("")
            return
        lines = messages(problems)
        more = f"  (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        self.problems_label.setText(lines[0] + more)
        self.problems_label.setToolTip(wrapped_tooltip("\n".join(lines)))

    def _warning_icon(self) -> QIcon:
        # QStyle is imported when first needed: making its Python enums costs 10 ms before the first paint.
        from PySide6.QtWidgets import QStyle

        return self.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning)

    # -- the run -------------------------------------------------------------------------------

    def _run_started(self, config: dict[str, Any]) -> None:
        thread = self.run_panel.thread
        if thread is not None:  # the engine's on_sample, queued to this (the GUI) thread
            thread.sample.connect(self.sample_viewer.add_sample, Qt.ConnectionType.QueuedConnection)
        self.sample_viewer.run_started(config)

    def _run_finished(self, outcome: RunOutcome) -> None:
        if self._close_when_stopped:
            self.close()
            return
        if "sampling" in self.side_panels:
            self.sample_viewer.run_ended()
        if outcome.error is not None and outcome.error.keys:
            self.show_setting(outcome.error.keys[0])

    def show_sample(self, path: Any) -> None:
        """A sample made outside a run (the sample window): listed first and played in the Sampling tab."""
        self.select_tab("sampling")
        self.sample_viewer.add_sample(path, play=True)

    def show_setting(self, key: str) -> bool:
        """Bring the tab holding this setting forward and focus its field; False if none shows it."""
        for index, spec in enumerate(TABS):
            if key in self.pages.keys[spec.name] and self.tabs.isTabVisible(index):
                self.tabs.setCurrentIndex(index)
                self.forms[spec.name].fields[key].editor.setFocus()
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
            if not self.remember and not self._confirm_discard():
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
        # The settings are kept for the next start (nothing is lost), so only a window that does not
        # remember (a screenshot) asks about unsaved ones; after a stop the user chose, it asked already.
        if not self.remember and not self._close_when_stopped and not self._confirm_discard():
            event.ignore()
            return
        if self.remember:
            settings = window_settings()
            settings.setValue("geometry", self.saveGeometry())
            settings.setValue("splitter", self.splitter.saveState())
            settings.setValue("run_area", self.run_area.saveState())
            for name, splitter in self.side_splitters.items():
                settings.setValue(f"side_{name}", splitter.saveState())
            based_on = None if self.loaded is None else self.loaded.name if self.loaded.listed else str(self.loaded.path)
            save_last_settings(self.config, based_on)
        if self.run_panel.is_busy():
            self.hide()  # the background import cannot be interrupted: wait for it out of sight
        for panel in self.side_panels.values():
            panel.shutdown()
        if "data" in self.pages.below_widgets:
            self.dataset_editor.shutdown()
        self.start_check.shutdown()
        self.run_panel.shutdown()
        self.run_area.shutdown()
        self.menus.close()
        event.accept()

