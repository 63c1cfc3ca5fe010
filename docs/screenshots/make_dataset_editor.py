"""Makes docs/screenshots/dataset-editor.png: the Data tab on the demo dataset with the dataset editor
below it, its thumbnails in, the doctor's report merged into the cells, one clip playing beside its
caption and a caption prefix set on the folder.

    xvfb-run -a -s "-screen 0 1400x1000x24" python docs/screenshots/make_dataset_editor.py
    QT_QPA_PLATFORM=offscreen python docs/screenshots/make_dataset_editor.py   (no X server; how the
                                                                                committed one was made)

The per-user folders (the thumbnail cache among them) are a temporary folder's; the demo dataset's
files are only read.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VIDEO_TRAINER_HOME"] = tempfile.mkdtemp(prefix="vt-editor-shot-")


def main() -> int:
    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    from gui.main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = MainWindow(remember=False)
    window.load("#demo tiny wan LoRA")
    window.resize(1400, 1000)
    window.show()
    window.select_tab("data")
    window.splitter.setSizes([900, 100])  # the tabs above the run area: room for the editor
    window.side_splitters["below_data"].setSizes([260, 640])
    editor = window.dataset_editor
    window.settle()
    datasets = [{**window.config["datasets"][0], "caption_prefix": "demo style"}]
    window.state.edit("datasets", datasets)
    window.state.mark_saved()
    editor.settle()
    first = editor.shown_paths()[0]
    editor.select_clip(first)
    wait = QEventLoop()
    QTimer.singleShot(1500, wait.quit)  # the player decodes the clip and shows its frames
    wait.exec()
    target = ROOT / "docs" / "screenshots" / "dataset-editor.png"
    ok = window.grab().save(str(target))
    print(f"wrote {target}" if ok else f"error: cannot write {target}")
    window.close()
    app.processEvents()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
