"""Makes docs/screenshots/demo-run.png: the window after training "#demo tiny wan LoRA" to the end,
on the sampling tab (its sample playing), with the loss and memory plots filled.

    xvfb-run -a -s "-screen 0 1400x1000x24" python docs/screenshots/make_demo_run.py

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
    folder = Path(tempfile.mkdtemp(prefix="vt-demo-shot-"))
    window = MainWindow(remember=False)
    window.load("#demo tiny wan LoRA")
    for key, value in {"workspace_dir": str(folder / "workspace"), "cache_dir": str(folder / "cache"),
                       "output_path": str(folder / "output" / "demo-lora.safetensors")}.items():
        window.state.edit(key, value)
    window.state.mark_saved()
    window.resize(1400, 1000)
    window.show()
    finished = QEventLoop()
    window.run_panel.run_finished.connect(lambda _outcome: finished.quit())
    if not window.run_panel.start():
        return 1
    finished.exec()
    window.select_tab("sampling")
    settle = QEventLoop()
    QTimer.singleShot(3000, settle.quit)  # the plots' timer redraws, the player shows its frames
    settle.exec()
    target = ROOT / "docs" / "screenshots" / "demo-run.png"
    ok = window.grab().save(str(target))
    print(f"wrote {target}" if ok else f"error: cannot write {target}")
    window.close()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
