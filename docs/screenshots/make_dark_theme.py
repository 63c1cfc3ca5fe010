"""Makes docs/screenshots/dark-theme.png: the window in View > Theme > Dark after "#demo tiny wan LoRA"
trained 100 steps, on the Sampling tab with a sample from Tools > Sample playing and the sample
window open beside it (its picture is docs/screenshots/sample-window.png).

    xvfb-run -a python docs/screenshots/make_dark_theme.py

(or QT_QPA_PLATFORM=offscreen). The run writes into a temporary folder; nothing of the user's is touched.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _wait(ms: int) -> None:
    from PySide6.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def main() -> int:
    from PySide6.QtCore import QEventLoop
    from PySide6.QtWidgets import QApplication

    from gui.main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    folder = Path(tempfile.mkdtemp(prefix="vt-dark-shot-"))
    window = MainWindow(remember=False)
    window.menus.choose_theme("DARK")
    window.load("#demo tiny wan LoRA")
    settings = {"workspace_dir": str(folder / "workspace"), "cache_dir": str(folder / "cache"),
                "output_path": str(folder / "output" / "demo-lora.safetensors"), "max_steps": 100,
                "sampling.every_n_steps": 0}
    for key, value in settings.items():
        window.state.edit(key, value)
    window.state.mark_saved()
    window.resize(1400, 1000)
    window.show()

    finished = QEventLoop()
    window.run_panel.run_finished.connect(finished.quit)
    if not window.run_panel.start():
        return 1
    finished.exec()

    window.menus.open_sample_window()
    dialog = window.menus.sample_window
    dialog.prompt.setPlainText("a small robot walks along a beach at sunset")
    for key, value in {"seed": 7, "width": 64, "height": 64, "frames": 9, "inference_steps": 4}.items():
        dialog.numbers[key].setValue(value)
    dialog.make()
    if not dialog.settle(300_000):
        print("error: the sample was not made in time")
        return 1
    _wait(1500)  # the plots' timer and the player's first frames
    shots = ROOT / "docs" / "screenshots"
    ok = window.grab().save(str(shots / "dark-theme.png")) and dialog.grab().save(str(shots / "sample-window.png"))
    print(f"wrote {shots / 'dark-theme.png'} and {shots / 'sample-window.png'}" if ok else "error: cannot write the screenshots")
    dialog.hide()
    window.close()
    del app
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
