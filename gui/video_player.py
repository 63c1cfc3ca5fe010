"""A looping player for sample videos: PyAV decodes on a worker thread, a QTimer shows the frames.

PySide6-Essentials has no QtMultimedia, and samples are short (tens of frames), so the whole video is
decoded once into QImages (scaled to at most MAX_SIDE, MAX_FRAMES frames) off the GUI thread; the
GUI thread only turns each into a pixmap scaled to the label and swaps it at the file's frame rate.
Still images (a sample may be one) are shown as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtGui import (
    QColor,
    QHideEvent,
    QImage,
    QPalette,
    QPixmap,
    QResizeEvent,
    QShowEvent,
)
from PySide6.QtWidgets import QLabel, QSizePolicy, QWidget

from core.errors import UserError

from .background import BackgroundJob, JobControl

log = logging.getLogger(__name__)

MAX_SIDE = 768  # bigger frames are scaled down while decoding: the panel is never larger
FRAME_BUDGET_BYTES = 256 * 2**20  # decoded frames kept for looping; a longer sample (unusual) is cut
CACHED_FRAMES = 240  # up to this many frames, the pixmaps scaled to the label are kept too
DEFAULT_FPS = 16.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class DecodedVideo:
    path: Path
    frames: list[QImage] = field(repr=False)
    fps: float
    width: int  # of the file's frames
    height: int
    cut: bool = False  # longer than FRAME_BUDGET_BYTES allows: the rest was not decoded


def _even(value: float) -> int:
    return max(2, int(value) // 2 * 2)


def decode_for_display(path: Path, control: JobControl) -> DecodedVideo:
    """Every frame of a video (or the one of an image) as QImages no larger than MAX_SIDE."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        image = QImage(str(path))
        if image.isNull():
            raise UserError(f"{path.name} cannot be shown: not a readable image")
        width, height = image.width(), image.height()
        if max(width, height) > MAX_SIDE:
            image = image.scaled(MAX_SIDE, MAX_SIDE, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation)
        return DecodedVideo(path, [image], 0.0, width, height)

    import av

    frames: list[QImage] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path.name} cannot be played: it has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else DEFAULT_FPS
            width, height = stream.codec_context.width, stream.codec_context.height
            scale = min(1.0, MAX_SIDE / max(width, height, 1))
            out_w, out_h = (_even(width * scale), _even(height * scale)) if scale < 1 else (width, height)
            most = max(1, FRAME_BUDGET_BYTES // (out_w * out_h * 3))
            for frame in container.decode(stream):
                control.check()
                if len(frames) >= most:
                    return DecodedVideo(path, frames, fps, width, height, cut=True)
                rgb = frame.to_ndarray(format="rgb24", width=out_w, height=out_h)
                # copy(): the QImage must own its pixels, the array goes away with this iteration.
                frames.append(QImage(rgb.data, rgb.shape[1], rgb.shape[0], rgb.strides[0], QImage.Format.Format_RGB888).copy())
    except av.error.FFmpegError as e:
        raise UserError(f"{path.name} cannot be played: {' '.join(str(e).split())[:160]}") from None
    if not frames:
        raise UserError(f"{path.name} cannot be played: it holds no frames")
    return DecodedVideo(path, frames, fps, width, height)


class VideoPlayer(QLabel):
    """Shows a DecodedVideo looping at its fps, scaled to fit; `play(path)` decodes in the background.

    `loaded(video)` when a file is on screen, `load_failed(message)` when it cannot be shown."""

    loaded = Signal(object)
    load_failed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setMinimumSize(96, 64)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Ignored)  # the pixmap follows the label
        # A dark stage, as video players have: via the palette (a style sheet costs more to apply).
        palette = self.palette()
        palette.setColor(QPalette.ColorRole.Window, QColor("#202020"))
        palette.setColor(QPalette.ColorRole.WindowText, QColor("#bbbbbb"))
        self.setPalette(palette)
        self.setAutoFillBackground(True)
        self.setWordWrap(True)
        self.video: DecodedVideo | None = None
        self.index = 0  # the frame on screen
        self.paused = False
        self._scaled: dict[int, QPixmap] = {}  # frame index -> pixmap at the current size
        self._scaled_for = QSize()
        self.job = BackgroundJob(decode_for_display, 0, "decoding a sample", self)
        self.job.finished_ok.connect(self._decoded)
        self.job.failed.connect(self._failed)
        self.timer = QTimer(self)
        self.timer.timeout.connect(self._next_frame)
        self.setText("No sample yet")

    def play(self, path: Path | str) -> None:
        self.job.request(Path(path), now=True)

    def clear(self, text: str = "No sample yet") -> None:
        self.job.cancel()
        self.timer.stop()
        self.video, self._scaled = None, {}
        self.setPixmap(QPixmap())
        self.setText(text)

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self._update_timer()

    def shutdown(self) -> None:
        self.timer.stop()
        self.job.shutdown()

    # -- decoding --------------------------------------------------------------------------------

    def _decoded(self, _path: Path, video: DecodedVideo) -> None:
        self.video, self.index, self._scaled = video, 0, {}
        self.setText("")
        self._show_frame()
        self._update_timer()
        self.loaded.emit(video)

    def _failed(self, _path: Path, message: str) -> None:
        self.timer.stop()
        self.video, self._scaled = None, {}
        self.setPixmap(QPixmap())
        self.setText(message)
        self.load_failed.emit(message)

    # -- playing ---------------------------------------------------------------------------------

    def _update_timer(self) -> None:
        video = self.video
        if video is None or len(video.frames) < 2 or self.paused or not self.isVisible():
            self.timer.stop()
            return
        self.timer.setInterval(max(10, round(1000 / (video.fps or DEFAULT_FPS))))
        if not self.timer.isActive():
            self.timer.start()

    def _next_frame(self) -> None:
        if self.video is None:
            return
        self.index = (self.index + 1) % len(self.video.frames)
        self._show_frame()

    def _show_frame(self) -> None:
        if self.video is None:
            return
        if self.size() != self._scaled_for:
            self._scaled, self._scaled_for = {}, QSize(self.size())
        pixmap = self._scaled.get(self.index)
        if pixmap is None:
            pixmap = QPixmap.fromImage(self.video.frames[self.index]).scaled(
                self.size() * self.devicePixelRatioF(), Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation
            )
            pixmap.setDevicePixelRatio(self.devicePixelRatioF())  # sharp at 200% scaling
            if len(self.video.frames) <= CACHED_FRAMES:
                self._scaled[self.index] = pixmap
        self.setPixmap(pixmap)

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802 (Qt's name)
        super().resizeEvent(event)
        self._show_frame()

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        self._show_frame()
        self._update_timer()

    def hideEvent(self, event: QHideEvent) -> None:  # noqa: N802 (Qt's name)
        super().hideEvent(event)
        self.timer.stop()  # nobody watches: no work
