"""Thumbnails for the dataset editor, made on a small thread pool, never on the GUI thread.

Each request goes to core.data.thumbnails.ThumbnailCache on a worker (decoding the first frame
when the cache has none, else reading the cached JPEG); the worker also loads it into a QImage
(QImage, unlike QPixmap, may be made off the GUI thread). Results are handed over through a queue
and taken on the GUI thread by a timer, a batch per tick, so a thousand thumbnails arriving at
once cost the window a few short ticks rather than a thousand signals.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtGui import QImage

from core.data.media import UnusableMedia
from core.data.thumbnails import ThumbnailCache
from core.paths import user_cache_dir

log = logging.getLogger(__name__)

WORKERS = 2  # decoding threads (PyAV releases the GIL); more would compete with a run's data workers
TICK_MS = 30  # how often arrived thumbnails are handed to the view
PER_TICK = 64  # at most this many per tick: each costs the view a repaint of its cell


def default_cache() -> ThumbnailCache:
    return ThumbnailCache(user_cache_dir() / "thumbnails")


class ThumbnailLoader(QObject):
    """`request(paths)`; `ready(path, QImage)` on the GUI thread for each, `failed(path, message)`
    for a file with no frame to show. A new request forgets what the previous one had not done."""

    ready = Signal(object, object)  # (Path, QImage)
    failed = Signal(object, str)

    def __init__(self, cache: ThumbnailCache | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.cache = cache or default_cache()
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="thumbnails")
        self._futures: list[Future] = []
        self._done: queue.SimpleQueue[tuple[int, Path, QImage | None, str]] = queue.SimpleQueue()
        self._generation = 0
        self._lock = threading.Lock()
        self._closed = False
        self._timer = QTimer(self)
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self._deliver)

    def request(self, paths: Iterable[Path]) -> None:
        """Make (or read) the thumbnails of these files, in this order."""
        if self._closed:
            return
        self.cancel()
        generation = self._generation
        self._futures = [self._pool.submit(self._one, generation, Path(p)) for p in paths]
        if self._futures:
            self._timer.start()

    def pending(self) -> int:
        """Requests not delivered yet (queued, running, or waiting for the next tick)."""
        return sum(1 for f in self._futures if not f.done()) + self._done.qsize()

    def cancel(self) -> None:
        with self._lock:
            self._generation += 1
        for future in self._futures:
            future.cancel()
        self._futures = []

    def shutdown(self) -> None:
        """Before the window goes: no more work, and the running ones waited for."""
        self._closed = True
        self.cancel()
        self._timer.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _one(self, generation: int, path: Path) -> None:
        with self._lock:
            if generation != self._generation:
                return
        try:
            image = QImage(str(self.cache.get(path)))
            if image.isNull():
                self._done.put((generation, path, None, "the thumbnail cannot be read"))
            else:
                self._done.put((generation, path, image, ""))
        except UnusableMedia as exc:
            self._done.put((generation, path, None, str(exc)))
        except Exception as exc:  # a bug in one file's thumbnail must not stop the others
            log.warning("thumbnail of %s failed", path, exc_info=True)
            self._done.put((generation, path, None, f"{type(exc).__name__}: {exc}"))

    def _deliver(self) -> None:
        for _ in range(PER_TICK):
            try:
                generation, path, image, message = self._done.get_nowait()
            except queue.Empty:
                break
            if generation != self._generation:
                continue  # asked for by a request since replaced
            if image is not None:
                self.ready.emit(path, image)
            else:
                self.failed.emit(path, message)
        if not self._futures or (all(f.done() for f in self._futures) and self._done.empty()):
            self._timer.stop()
