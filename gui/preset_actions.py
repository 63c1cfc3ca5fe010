"""Presets in the window: load, save, save as, and the last settings used put back at start-up.

A mixin of MainWindow (gui.main_window), split out by idea: it uses the window's `state` (ConfigState),
`loaded` preset, `preset_bar`, `remember` flag and status bar, and nothing else of it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtWidgets import QMessageBox, QStatusBar

from core.config.presets import (
    BUNDLED_PREFIX,
    DEMO_PRESET,
    LoadedPreset,
    check_user_preset_name,
    open_preset,
    save_user_preset,
    user_preset_path,
)
from core.errors import ConfigError

from .config_state import messages
from .window_state import load_last_settings, window_settings

if TYPE_CHECKING:
    from .config_state import ConfigState, Problem
    from .preset_bar import PresetBar

log = logging.getLogger(__name__)

APP_TITLE = "Video Trainer"
FIRST_START_NOTE = (
    "First start: the demo preset is loaded. Press Start to train it offline (the bundled tiny model on "
    "the bundled clips, nothing downloaded, a minute or two on a CPU), or pick another preset above."
)


class PresetActions:
    """Loading and saving presets; MainWindow provides the attributes below."""

    state: ConfigState
    loaded: LoadedPreset | None
    preset_bar: PresetBar
    remember: bool

    if TYPE_CHECKING:  # MainWindow's (QMainWindow's) own

        @property
        def config(self) -> dict[str, Any]: ...

        def invalid_settings(self) -> list[Problem]: ...

        def statusBar(self) -> QStatusBar: ...  # noqa: N802 (Qt's name)

    def load(self, name_or_file: str) -> None:
        """Load a preset (by name) or a config file (by path) into the window; raises ConfigError."""
        self.apply(open_preset(name_or_file))

    def apply(self, loaded: LoadedPreset) -> None:
        self.loaded = loaded
        self.preset_bar.set_note("")  # the first start's note is about the demo, loaded before this
        self.state.replace(loaded.config)
        self.preset_bar.select(loaded.name if loaded.listed else None)
        log.info("loaded %s", loaded.path)
        if self.remember and loaded.listed:
            window_settings().setValue("last_preset", loaded.name)

    def restore_last_settings(self) -> None:
        """The settings as the window was closed with, over the preset they were based on (shown as
        modified against it); without them the last preset loaded; at the very first start (neither)
        the demo preset, with a line saying that Start trains it offline."""
        last = load_last_settings()
        name = last[1] if last is not None else window_settings().value("last_preset")
        if last is None and not name:
            self.load_first_start()
            return
        if isinstance(name, str) and name:
            try:
                self.load(name)
            except ConfigError as e:
                log.warning("last preset not loaded: %s", e)
                self.statusBar().showMessage(f"The last preset, '{name}', could not be loaded: {e}", 15000)
        if last is not None:
            self.state.restore(last[0])

    def load_first_start(self) -> None:
        """The very first start: the demo preset and one line about it (defaults if it is missing)."""
        try:
            self.load(DEMO_PRESET)
        except ConfigError as e:
            log.warning("the demo preset was not loaded at the first start: %s", e)
            return
        self.preset_bar.set_note(FIRST_START_NOTE)

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
        from PySide6.QtWidgets import QInputDialog  # when asked for: its Python class is not made before the first paint

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
            QMessageBox.warning(self, "Save preset", "Fix these settings first:\n\n" + "\n".join(messages(problems)))
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
