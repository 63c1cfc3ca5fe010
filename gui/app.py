"""Start the window: the QApplication, the error dialog for unexpected errors, and --screenshot.

Nothing here (or anywhere in gui/) imports torch or diffusers: the window must open in a second
even on a machine where importing torch takes ten. Training code is imported when a run starts.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from types import TracebackType
from typing import TYPE_CHECKING

from core.config.presets import LoadedPreset, open_preset
from core.errors import ConfigError, UserError
from core.log_setup import log_file_path, setup_logging
from core.paths import resources_dir

if TYPE_CHECKING:
    from PySide6.QtWidgets import QApplication, QWidget

log = logging.getLogger(__name__)

APP_NAME = "Video Trainer"
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
WARM_UP_DELAY_MS = 1000
EXIT_WHEN_SHOWN_ENV = "VIDEO_TRAINER_EXIT_WHEN_SHOWN"  # benchmarks/gui_launch.py: exit once the window shows


def run_app(preset: str | None = None, tab: str | None = None, screenshot: str | None = None) -> int:
    """Open the window (optionally with a preset and a tab); with screenshot, save a PNG and exit."""
    setup_logging()
    loaded: LoadedPreset | None = None
    if preset:
        # Checked before any window exists, so a bad preset is one line and exit code 2.
        try:
            loaded = open_preset(preset)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
    if not _has_display():
        if not screenshot:
            print(
                "error: no display found (DISPLAY and WAYLAND_DISPLAY are unset); run the window in a desktop "
                "session, or use the commands listed by 'main.py --help' on a headless machine",
                file=sys.stderr,
            )
            return EXIT_USER_ERROR
        os.environ["QT_QPA_PLATFORM"] = "offscreen"  # a screenshot needs no screen

    from PySide6.QtCore import QTimer, qInstallMessageHandler
    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QApplication

    from .main_window import MainWindow

    qInstallMessageHandler(_qt_message)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    app.setApplicationName(APP_NAME)
    # Matches installers' video-trainer.desktop, so Wayland docks show the window with its icon.
    app.setDesktopFileName("video-trainer")
    icon_file = resources_dir() / "icon.png"
    if icon_file.is_file():
        app.setWindowIcon(QIcon(str(icon_file)))
    failures = install_excepthook(interactive=not screenshot)

    window = MainWindow(remember=not screenshot)
    if loaded is not None:
        window.apply(loaded)
    elif not screenshot:
        window.restore_last_settings()
    if tab and not window.select_tab(tab):
        log.warning("the %s tab does not apply to these settings; showing %s", tab, window.tabs.tabText(window.tabs.currentIndex()))
    window.show()
    if os.environ.get(EXIT_WHEN_SHOWN_ENV):
        return _exit_when_shown(app, window)

    if screenshot:
        for _ in range(3):  # let layouts and deferred resizes settle before grabbing
            app.processEvents()
        window.settle()  # the side panel's report (doctor, estimate, sample) in the picture
        app.processEvents()
        if not window.grab().save(screenshot):
            print(f"error: cannot write the screenshot to {screenshot}; check the folder exists", file=sys.stderr)
            return EXIT_FAILURE
        window.close()
        return EXIT_FAILURE if failures else 0

    # Load torch and the engine while the user reads the settings, so Start does not wait for them;
    # after a moment, so the window is drawn first.
    QTimer.singleShot(WARM_UP_DELAY_MS, window.run_panel.warm_up)
    # Ctrl+C in the terminal closes the window instead of being swallowed by Qt's event loop.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return int(app.exec())


def _exit_when_shown(app: QApplication, window: QWidget) -> int:
    """For benchmarks/gui_launch.py: print when the window has first been painted, then exit."""
    from PySide6.QtCore import QEvent, QObject, QTimer

    class FirstPaint(QObject):
        def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
            if event.type() == QEvent.Type.Paint and watched is window:
                window.removeEventFilter(self)
                QTimer.singleShot(0, shown)  # after this paint has been done
            return False

    def shown() -> None:
        # A line for the benchmark to read: wall-clock time, comparable with the parent's.
        sys.stdout.write(f"window shown {time.time():.6f}\n")
        sys.stdout.flush()
        window.close()
        app.quit()

    watcher = FirstPaint(window)
    window.installEventFilter(watcher)
    return int(app.exec())


def _qt_message(mode: object, _context: object, message: str) -> None:
    """Qt's own warnings go to the log file rather than the terminal: they are for developers."""
    from PySide6.QtCore import QtMsgType

    level = {
        QtMsgType.QtDebugMsg: logging.DEBUG,
        QtMsgType.QtInfoMsg: logging.DEBUG,
        QtMsgType.QtWarningMsg: logging.INFO,
    }.get(mode, logging.ERROR)  # type: ignore[call-overload]
    logging.getLogger("qt").log(level, "%s", message)


def _has_display() -> bool:
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def install_excepthook(interactive: bool = True) -> list[BaseException]:
    """Route errors that escape Qt slots to the log file and a dialog; returns the list they go in.

    A UserError is the user's to fix: its one line is shown, without a traceback. Anything else is
    a bug: logged with its traceback, shown as one line with the traceback behind "Show Details".
    Without `interactive` (screenshots, tests) nothing is shown; the error is logged and listed.
    """
    failures: list[BaseException] = []
    showing = False

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        nonlocal showing
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        failures.append(exc)
        if isinstance(exc, UserError):
            log.warning("%s", exc)
        else:
            log.error("unexpected error in the window", exc_info=(exc_type, exc, tb))
        if not interactive:
            print(f"error: {exc_type.__name__}: {exc}", file=sys.stderr)
            return
        if showing:  # an error while the dialog is open: logged above, one dialog is enough
            return
        showing = True
        try:
            _show_error(exc_type, exc, tb)
        finally:
            showing = False

    sys.excepthook = hook
    return failures


def _show_error(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    from PySide6.QtWidgets import QApplication, QMessageBox

    box = QMessageBox(QApplication.activeWindow())
    box.setWindowTitle(APP_NAME)
    if isinstance(exc, UserError):
        box.setIcon(QMessageBox.Icon.Warning)
        box.setText(str(exc))
    else:
        box.setIcon(QMessageBox.Icon.Critical)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        box.setText(f"Something went wrong: {exc_type.__name__}: {first_line}".rstrip(": "))
        box.setInformativeText(f"This is a bug in Video Trainer. The details are also in the log file:\n{log_file_path()}")
        box.setDetailedText("".join(traceback.format_exception(exc_type, exc, tb)))
    box.exec()
