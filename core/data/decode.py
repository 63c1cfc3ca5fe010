"""Decoding: the frames at given times, upright, as uint8 RGB; and fitting them to a bucket.

Only what a sample needs is decoded. Packets are demuxed in order (cheap) and held back; they reach
the decoder only once they are known to be needed, that is when a packet at or past the next
requested time shows up before any later keyframe. A keyframe at or before the next requested time
makes everything held back useless (decoding restarts there), and a requested time more than
SEEK_GAP seconds ahead is reached with a container seek instead of demuxing through.
For each requested time the decoded frame with the nearest presentation time is taken, so
variable frame rate clips work like constant ones.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .media import MediaInfo, UnusableMedia
from .mp4_boxes import explained
from .probe import ffmpeg_cause, open_video, read_image, stream_start

log = logging.getLogger(__name__)

SEEK_GAP = 2.0  # seconds: a requested time this far ahead of the demuxer is reached by seeking


def _is_flush(packet: Any) -> bool:
    return packet.size == 0 and packet.pts is None and packet.dts is None


def _ts(packet: Any) -> int | None:
    return packet.pts if packet.pts is not None else packet.dts


class _Picker:
    """Decodes one stream forward from wherever the demuxer is and resolves requested pts in order."""

    def __init__(self, container: Any, stream: Any, targets: list[float], frame_step: float, skip_nonref: bool) -> None:
        self.container = container
        self.stream = stream
        self.targets = targets  # sorted, unique, in stream time-base units
        self.frame_step = frame_step  # one frame's duration in time-base units (estimates missing pts)
        # Frames nothing refers to (most B-frames) need decoding only near a requested time.
        self.skip_nonref = skip_nonref
        self.skipping = False
        self.picked: list[Any] = [None] * len(targets)
        self.next = 0  # index of the first unresolved target
        self.prev: tuple[float, Any] | None = None  # last frame out of the decoder
        self.decoded = 0
        self.seeks = 0

    @property
    def done(self) -> bool:
        return self.next >= len(self.targets)

    def _take(self, frames: list[Any]) -> None:
        for frame in frames:
            self.decoded += 1
            if frame.pts is not None:
                pts = float(frame.pts)
            elif self.prev is not None:
                pts = self.prev[0] + self.frame_step
            else:
                pts = 0.0
            while not self.done and pts >= self.targets[self.next]:
                target = self.targets[self.next]
                # Nearest presentation time wins; a tie goes to the earlier frame.
                use_prev = self.prev is not None and target - self.prev[0] <= pts - target
                self.picked[self.next] = self.prev[1] if use_prev else frame
                self.next += 1
            self.prev = (pts, frame)

    def send(self, packets: Sequence[Any]) -> None:
        for packet in packets:
            if self.skip_nonref:
                skip = packet.pts is not None and not self._near_target(float(packet.pts))
                if skip != self.skipping:
                    self.stream.codec_context.skip_frame = "NONREF" if skip else "DEFAULT"
                    self.skipping = skip
            self._take(self.stream.decode(packet))

    def _near_target(self, pts: float) -> bool:
        """Could this frame be the nearest to a requested time? (Within 1.5 frames of one.)"""
        i = bisect.bisect_left(self.targets, pts)
        band = 1.5 * self.frame_step
        return any(abs(self.targets[j] - pts) <= band for j in (i - 1, i) if 0 <= j < len(self.targets))

    def drain(self) -> None:
        self._take(self.stream.decode(None))
        self.stream.codec_context.flush_buffers()

    def seek(self, target: float) -> Iterator[Any]:
        """Seek to the last keyframe whose frame is at or before `target`; return the packets from there.

        Some demuxers (MP4) seek by decode time, which can land on a keyframe displayed after the
        target (B-frame reordering); then seek again just before it.
        """
        self.seeks += 1
        offset = int(target)
        start = stream_start(self.stream)
        packets: Iterator[Any] = iter(())
        for _ in range(4):
            self.container.seek(offset, backward=True, any_frame=False, stream=self.stream)
            packets = self.container.demux(self.stream)
            first = next(packets, None)
            if first is None:
                return iter(())
            packets = itertools.chain([first], packets)
            ts = _ts(first)
            if ts is None or ts <= target or offset <= start:
                break
            earlier = first.dts if first.dts is not None else ts
            offset = max(start, min(offset, earlier) - 1)
        self.prev = None  # frames from before the seek are not neighbours of what follows
        return packets

    def run(self) -> None:
        gap = SEEK_GAP / float(self.stream.time_base)
        seeked_for = -1
        if self.targets[0] - stream_start(self.stream) > gap:
            packets, seeked_for = self.seek(self.targets[0]), 0
        else:
            packets = self.container.demux(self.stream)
        held: list[Any] = []  # packets since the last keyframe, not yet known to be needed
        sending_for = -1  # while >= self.next, every packet goes to the decoder until that target resolves
        dirty = False  # the decoder has had packets since the last flush
        while not self.done:
            packet = next(packets, None)
            if packet is None:
                break
            if _is_flush(packet):
                continue
            if sending_for >= self.next:
                self.send([packet])
                continue
            ts = _ts(packet)
            target = self.targets[self.next]
            if packet.is_keyframe and ts is not None and ts <= target:
                if dirty:
                    self.stream.codec_context.flush_buffers()  # restart at this keyframe, as a seek would
                    self.prev, dirty = None, False
                held = [packet]
                continue
            held.append(packet)
            if ts is not None and ts >= target:
                # The target lies in the held pictures: decode them, then on until the target resolves.
                self.send(held)
                held, dirty, sending_for = [], True, self.next
            elif ts is not None and target - ts > gap and seeked_for != self.next:
                seeked_for = self.next
                packets = self.seek(target)
                held, dirty = [], False
        if not self.done:
            self.send(held)
            self.drain()


def _to_rgb(frame: Any, rotation: int) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    if rotation:
        rgb = np.rot90(rgb, k=-(rotation // 90))  # rot90 turns counter-clockwise; display is clockwise
    return rgb


def decode_frames(
    path: Path, times: Sequence[float], info: MediaInfo, *, stats: dict[str, int] | None = None
) -> np.ndarray:
    """The frames nearest to `times` (s), as uint8 (T, H, W, 3) RGB in display orientation.

    Images give (1, H, W, 3). UnusableMedia (one line) when the file fails to decode. `stats`, when
    given, receives how many frames were decoded ("decoded") and how many seeks it took ("seeks").
    """
    path = Path(path)
    if not info.is_video:
        return read_image(path)[None]
    if len(times) == 0:
        return np.zeros((0, info.height, info.width, 3), np.uint8)
    import av

    try:
        container, stream = open_video(path)
    except UnusableMedia as exc:  # damaged since probing: say how, as probing does
        raise explained(path, exc) from None
    picker = None
    try:
        stream.thread_type = "AUTO"
        tb = float(stream.time_base)
        start = stream_start(stream)
        unique = sorted({float(t) for t in times})
        targets = [start + t / tb for t in unique]
        # Not for VFR clips: a frame's neighbours there may be further apart than the average step.
        picker = _Picker(container, stream, targets, 1.0 / (max(info.fps, 1e-3) * tb), not info.variable_frame_rate)
        picker.run()
        if picker.prev is None and picker.picked[0] is None:
            raise UnusableMedia(f"no frame could be decoded near {unique[0]:.2f} s")
        if not picker.done:
            # The stream ended before the last requested times: fine within a frame or so of the end.
            last_t = (picker.prev[0] - start) * tb if picker.prev else 0.0
            missing = unique[picker.next]
            if missing - last_t > max(0.25, 3.0 / max(info.fps, 1e-3)):
                raise UnusableMedia(f"truncated or corrupt: the video ends at {last_t:.2f} s, a frame at {missing:.2f} s was asked for")
            for i in range(picker.next, len(targets)):
                picker.picked[i] = picker.prev[1] if picker.prev else None
        out = _assemble(times, unique, picker.picked, info.rotation)
    except (av.FFmpegError, ValueError, OSError) as exc:  # PyAV raises ValueError for formats it cannot convert
        where = ""
        if picker is not None and not picker.done:
            where = f" near {(picker.targets[picker.next] - stream_start(stream)) * float(stream.time_base):.2f} s"
        raise explained(path, UnusableMedia(f"decoding failed{where}: {ffmpeg_cause(exc)}")) from None
    finally:
        container.close()
    log.debug("%s: %d frames decoded, %d seeks, for %d requested", path.name, picker.decoded, picker.seeks, len(times))
    if stats is not None:
        stats.update(decoded=picker.decoded, seeks=picker.seeks)
    return out


def _assemble(times: Sequence[float], unique: list[float], picked: list[Any], rotation: int) -> np.ndarray:
    """Convert each picked frame once, straight into one (T, H, W, 3) array in the requested order.

    One output array and one short-lived conversion buffer: holding T converted frames and then
    stacking them would touch twice the memory, which costs as much as decoding at 720p.
    """
    slots: dict[int, list[int]] = {}  # id(frame) -> positions in the output
    frames: dict[int, Any] = {}
    where = {t: i for i, t in enumerate(unique)}
    for pos, t in enumerate(times):
        frame = picked[where[float(t)]]
        if frame is None:
            raise UnusableMedia(f"no frame could be decoded near {float(t):.2f} s")
        slots.setdefault(id(frame), []).append(pos)
        frames[id(frame)] = frame
    out: np.ndarray | None = None
    for key, positions in slots.items():
        rgb = _to_rgb(frames[key], rotation)
        if out is None:
            out = np.empty((len(times), *rgb.shape), np.uint8)
        elif rgb.shape != out.shape[1:]:
            rgb = _resize(rgb, out.shape[1], out.shape[2])  # a stream may change size mid-way
        for pos in positions:
            out[pos] = rgb
    assert out is not None
    return out


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    shrinking = height * width < rgb.shape[0] * rgb.shape[1]
    src = np.ascontiguousarray(rgb)  # a rotated frame is a strided view
    return cv2.resize(src, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def fit_to_bucket(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale (T, H, W, 3) frames to cover height x width, keeping the aspect ratio, and centre-crop.

    INTER_AREA when shrinking (no aliasing), INTER_CUBIC when enlarging.
    """
    import cv2

    single = frames.ndim == 3
    batch = frames[None] if single else frames
    src_h, src_w = batch.shape[1:3]
    scale = max(height / src_h, width / src_w)
    new_h = max(height, int(round(src_h * scale)))
    new_w = max(width, int(round(src_w * scale)))
    if (new_h, new_w) != (src_h, src_w):
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
        # ascontiguousarray: OpenCV refuses the negative strides of np.flip'd (reversed) frames.
        batch = np.stack([cv2.resize(np.ascontiguousarray(f), (new_w, new_h), interpolation=interp) for f in batch])
    y0, x0 = (new_h - height) // 2, (new_w - width) // 2
    out = np.ascontiguousarray(batch[:, y0:y0 + height, x0:x0 + width])
    return out[0] if single else out
