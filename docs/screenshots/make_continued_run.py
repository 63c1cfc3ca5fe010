"""Makes docs/screenshots/continued-run.png: "#demo tiny wan LoRA" trained to 100 steps, then
max_steps raised to 200 and Continue pressed: the plots hold both parts, the log says how the
learning-rate schedule was carried on.

    QT_QPA_PLATFORM=offscreen python docs/screenshots/make_continued_run.py

The run writes into a temporary folder; nothing of the user's is touched.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    from gui.main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    folder = Path(tempfile.mkdtemp(prefix="vt-continued-shot-"))
    window = MainWindow(remember=False)
    window.load("#demo tiny wan LoRA")
    for key, value in {"workspace_dir": str(folder / "workspace"), "cache_dir": str(folder / "cache"),
                       "output_path": str(folder / "output" / "demo-lora.safetensors"), "max_steps": 100}.items():
        window.state.edit(key, value)
    window.state.mark_saved()
    window.resize(1400, 1000)
    window.show()

    def run(start) -> bool:
        finished = QEventLoop()
        window.run_panel.run_finished.connect(finished.quit)
        try:
            if not start():
                return False
            finished.exec()
        finally:
            window.run_panel.run_finished.disconnect(finished.quit)
        return True

    if not run(window.run_panel.start):
        return 1
    window.state.edit("max_steps", 200)
    window.state.mark_saved()
    if not run(window.run_panel.resume):
        return 1
    settle = QEventLoop()
    QTimer.singleShot(2000, settle.quit)  # the plots' timer redraws
    settle.exec()
    target = ROOT / "docs" / "screenshots" / "continued-run.png"
    ok = window.grab().save(str(target))
    print(f"wrote {target}" if ok else f"error: cannot write {target}")
    window.close()
    del app
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
