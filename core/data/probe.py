"""Probing: what a media file is (size after rotation, fps, duration, frames, codec, VFR), cheaply.

Container metadata gives the numbers; decoding the first frame and one frame near the end proves the
stream is usable, so a truncated file is reported here rather than failing half-way through training.
All times are seconds from the video stream's first timestamp.
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .media import IMAGE_EXTENSIONS, MediaInfo, UnusableMedia
from .mp4_boxes import explained

log = logging.getLogger(__name__)

MIN_SIDE = 16
MAX_SIDE = 8192
VFR_PACKETS = 60  # packet timestamps looked at to decide variable frame rate
REORDER_DEPTH = 16  # most packets a frame is decoded ahead of its display position (H.264's DPB limit)
END_CHECK_SECONDS = 1.0  # how far before the end probing seeks to prove the tail is readable
FIRST_FRAME_PACKETS = 2000  # give up looking for a first decodable frame after this many packets


# ---------------------------------------------------------------- shared helpers (decode.py uses them)

def ffmpeg_cause(exc: BaseException) -> str:
    """A short cause from a PyAV error, without the file name FFmpeg appends."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:160]


def check_readable(path: Path) -> None:
    """Fail with a one-line reason when the file cannot be opened for reading or is empty."""
    try:
        with path.open("rb") as handle:
            first = handle.read(1)
    except FileNotFoundError:
        raise UnusableMedia("file not found") from None
    except PermissionError:
        raise UnusableMedia("cannot read the file: permission denied") from None
    except IsADirectoryError:
        raise UnusableMedia("is a folder, not a file") from None
    except OSError as exc:
        raise UnusableMedia(f"cannot read the file: {exc.strerror or exc}") from None
    if not first:
        raise UnusableMedia("truncated or corrupt: the file is empty")


def open_video(path: Path) -> tuple[Any, Any]:
    """Open a container and return (container, its video stream); UnusableMedia when neither works."""
    import av

    try:
        container = av.open(str(path), metadata_errors="replace")
    except av.FFmpegError as exc:
        raise UnusableMedia(f"truncated or corrupt: {ffmpeg_cause(exc)}") from None
    except (OSError, ValueError, UnicodeError) as exc:
        raise UnusableMedia(f"cannot open: {ffmpeg_cause(exc)}") from None
    try:
        streams = [s for s in container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
        if not streams:
            if container.streams.audio:
                raise UnusableMedia("has no video stream (audio only?)")
            raise UnusableMedia("has no video stream")
        stream = streams[0]
        if stream.codec_context is None:
            raise UnusableMedia(f"unsupported codec: {_codec_hint(path)} (this FFmpeg build cannot decode it)")
    except BaseException:
        container.close()
        raise
    return container, stream


def stream_start(stream: Any) -> int:
    return int(stream.start_time) if stream.start_time is not None else 0


def clockwise_rotation(frame: Any, stream: Any) -> int:
    """Degrees clockwise to turn stored frames for display (0/90/180/270).

    FFmpeg attaches the stream's display matrix to each decoded frame; PyAV's frame.rotation is its
    counter-clockwise angle (a phone's "rotate=90" reads -90). Old files may only carry the tag.
    """
    ccw = getattr(frame, "rotation", 0) or 0
    if ccw:
        return int(round(-float(ccw) / 90.0)) % 4 * 90
    tag = stream.metadata.get("rotate") if stream.metadata else None
    try:
        return int(round(float(tag) / 90.0)) % 4 * 90 if tag else 0
    except ValueError:
        return 0


def _codec_hint(path: Path) -> str:
    """Name an undecodable stream's codec from the file's header, since PyAV only knows decodable ones."""
    try:
        with path.open("rb") as handle:
            head = handle.read(1 << 16)
    except OSError:
        return "unknown codec"
    at = head.find(b"strf")  # AVI: BITMAPINFOHEADER biCompression
    if head[:4] == b"RIFF" and at >= 0 and len(head) >= at + 28:
        tag = head[at + 24:at + 28]
    else:
        at = head.find(b"stsd")  # MP4/MOV: the first sample entry's type
        tag = head[at + 16:at + 20] if at >= 0 and len(head) >= at + 20 else b""
        if not tag:
            match = re.search(rb"V_[A-Z0-9/_]{2,32}", head)  # Matroska CodecID
            tag = match.group(0) if match else b""
    text = tag.decode("ascii", "replace").strip("\x00 ")
    return f"'{text}'" if text and text.isprintable() else "unknown codec"


def _check_size(width: int, height: int) -> None:
    if min(width, height) < MIN_SIDE:
        raise UnusableMedia(f"frames are {width}x{height} pixels, smaller than the {MIN_SIDE}-pixel minimum on a side")
    if max(width, height) > MAX_SIDE:
        raise UnusableMedia(f"frames are {width}x{height} pixels, larger than the {MAX_SIDE}-pixel limit on a side")


# ---------------------------------------------------------------- images

def read_image(path: Path) -> np.ndarray:
    """An image as uint8 RGB (H, W, 3), upright (OpenCV applies EXIF orientation)."""
    import cv2

    try:
        data = np.fromfile(str(path), dtype=np.uint8)  # not cv2.imread: it fails on non-ASCII paths on Windows
    except OSError as exc:
        raise UnusableMedia(f"cannot read the file: {exc.strerror or exc}") from None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise UnusableMedia("truncated or corrupt: the image cannot be decoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _image_codec(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(12)
    if head.startswith(b"\x89PNG"):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "mjpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return path.suffix.lower().lstrip(".")


def _probe_image(path: Path, size_bytes: int, mtime_ns: int) -> MediaInfo:
    rgb = read_image(path)
    height, width = rgb.shape[:2]
    _check_size(width, height)
    return MediaInfo(path, "image", width, height, 0, 1.0, 0.0, 1, _image_codec(path), False, size_bytes, mtime_ns)


# ---------------------------------------------------------------- videos

def _packets(container: Any, stream: Any) -> Iterator[Any]:
    """Demuxed packets of one stream, without the empty flush packet PyAV adds at the end."""
    for packet in container.demux(stream):
        if packet.size == 0 and packet.pts is None and packet.dts is None:
            continue
        yield packet


def _first_frame(container: Any, stream: Any) -> tuple[Any, list[int]]:
    """Decode the first frame; also return the timestamps of the first VFR_PACKETS packets."""
    import av

    frame = None
    stamps: list[int] = []
    seen = 0
    try:
        for packet in _packets(container, stream):
            seen += 1
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is not None and len(stamps) < VFR_PACKETS:
                stamps.append(int(ts))
            if frame is None:
                decoded = stream.decode(packet)
                if decoded:
                    frame = decoded[0]
                elif seen > FIRST_FRAME_PACKETS:
                    break
            if frame is not None and len(stamps) >= VFR_PACKETS:
                break
        if frame is None:
            decoded = stream.decode(None)  # drain: a short clip's only frames may still be in the decoder
            frame = decoded[0] if decoded else None
    except av.FFmpegError as exc:
        raise UnusableMedia(f"truncated or corrupt: {ffmpeg_cause(exc)}") from None
    if frame is None:
        raise UnusableMedia("has no decodable frames" if seen else "has no frames (the video stream is empty)")
    return frame, stamps


def _is_vfr(stamps: list[int]) -> bool:
    """True when packet timestamps (in decode order), put in display order, are not evenly spaced.

    B-frames reorder: the frames just after the last packets read may still be unread, so only
    timestamps below the smallest of the last REORDER_DEPTH packets are compared. A tick or 5% of
    slack: millisecond time bases round 24 fps to gaps of 41 and 42.
    """
    if len(stamps) > 2 * REORDER_DEPTH:
        complete_below = min(stamps[-REORDER_DEPTH:])
        stamps = [s for s in stamps if s <= complete_below]
    ordered = sorted(set(stamps))
    deltas = np.diff(np.asarray(ordered, dtype=np.float64))
    if deltas.size < 2:
        return False
    median = float(np.median(deltas))
    slack = max(1.5, 0.05 * median)
    return bool(np.any(np.abs(deltas - median) > slack))


def _check_tail(container: Any, stream: Any, duration: float) -> float | None:
    """Seek close to the end, decode one frame, and demux to the end; return where the data ends (s).

    A file cut off inside the last second fails here; the caller compares the end with the duration.
    """
    import av

    tb = stream.time_base
    start = stream_start(stream)
    target = max(0.0, duration - END_CHECK_SECONDS)
    frame = None
    last_time = None
    try:
        container.seek(start + int(target / tb), backward=True, any_frame=False, stream=stream)
        seeked = True
    except av.FFmpegError as exc:
        # Some files cannot seek (no index): demux on from here to find the end, without decoding,
        # since the decoder would start mid-way between keyframes.
        log.debug("cannot seek near the end (%s); reading on", ffmpeg_cause(exc))
        seeked = False
    try:
        for packet in _packets(container, stream):
            if packet.is_corrupt:
                raise UnusableMedia("truncated or corrupt: damaged data near the end")
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is not None:
                end = float((ts - start + (packet.duration or 0)) * tb)
                last_time = end if last_time is None else max(last_time, end)
            if frame is None and seeked:
                decoded = stream.decode(packet)
                frame = decoded[0] if decoded else None
        if frame is None and seeked:
            decoded = stream.decode(None)
            frame = decoded[0] if decoded else None
    except av.FFmpegError as exc:
        raise UnusableMedia(f"truncated or corrupt: {ffmpeg_cause(exc)} near the end") from None
    if frame is None and seeked:
        raise UnusableMedia(f"truncated or corrupt: no frame decodes in the last {END_CHECK_SECONDS:g} s")
    return last_time


def _rate(stream: Any) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and float(rate) > 0 and float(rate) < 1000:
            return float(rate)
    return None


def _probe_video(path: Path, size_bytes: int, mtime_ns: int) -> MediaInfo:
    container, stream = open_video(path)
    try:
        stream.thread_type = "AUTO"
        frame, stamps = _first_frame(container, stream)
        rotation = clockwise_rotation(frame, stream)
        stored_w, stored_h = frame.width, frame.height
        width, height = (stored_h, stored_w) if rotation in (90, 270) else (stored_w, stored_h)
        _check_size(width, height)

        tb = stream.time_base or Fraction(1, 1_000_000)
        fps = _rate(stream)
        duration = float(stream.duration * tb) if stream.duration else 0.0
        if duration <= 0 and container.duration:
            duration = container.duration / 1_000_000  # av.time_base: microseconds
        frames = int(stream.frames or 0)
        if fps is None:
            fps = frames / duration if frames and duration > 0 else 24.0
        if duration <= 0:
            duration = frames / fps if frames else 1.0 / fps
        if frames <= 0:
            frames = max(1, int(round(duration * fps)))
        vfr = _is_vfr(stamps)
        data_end = _check_tail(container, stream, duration)
        # Two frames of slack (and 1% for muxers that round durations generously).
        if data_end is not None and data_end < duration - max(2.0 / fps, 0.1, 0.01 * duration):
            if not stream.duration and container.streams.audio:
                # Only the container's duration was known, and audio may outlast the video: trust the data.
                log.debug("%s: video ends at %.3f s, container says %.3f s", path, data_end, duration)
                duration = data_end
                frames = min(frames, max(1, int(round(duration * fps))))
            else:
                raise UnusableMedia(f"truncated or corrupt: the data ends at {data_end:.2f} s of {duration:.2f} s")
        codec = stream.codec_context.name
    finally:
        container.close()
    return MediaInfo(path, "video", width, height, rotation, fps, duration, frames, codec, vfr, size_bytes, mtime_ns)


def probe(path: Path) -> MediaInfo:
    """Describe a media file, or raise UnusableMedia with a one-line reason."""
    path = Path(path)
    check_readable(path)
    stat = path.stat()
    image = path.suffix.lower() in IMAGE_EXTENSIONS
    try:
        if image:
            return _probe_image(path, stat.st_size, stat.st_mtime_ns)
        return _probe_video(path, stat.st_size, stat.st_mtime_ns)
    except UnusableMedia as exc:
        # FFmpeg's reason for a cut-off MP4 depends on where the cut fell (even "unsupported codec");
        # the file's box structure says which it is.
        raise exc if image else explained(path, exc) from None
    except MemoryError:
        raise UnusableMedia("cannot probe: out of memory reading the file") from None
    except Exception as exc:  # any other library failure on a bad file is still just a bad file
        log.debug("probe of %s failed", path, exc_info=True)
        raise explained(path, UnusableMedia(f"truncated or corrupt: {ffmpeg_cause(exc)}")) from None


# ---------------------------------------------------------------- keyframes and scene cuts

def keyframe_times(path: Path, *, until: float | None = None) -> list[float]:
    """Times (s) of the video stream's keyframes, from packet flags: demuxing only, no decoding."""
    import av

    container, stream = open_video(Path(path))
    times: list[float] = []
    try:
        tb, start = stream.time_base, stream_start(stream)
        for packet in _packets(container, stream):
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                continue
            t = float((ts - start) * tb)
            if until is not None and t > until:
                break
            if packet.is_keyframe:
                times.append(round(t, 6))
    except av.FFmpegError as exc:
        raise UnusableMedia(f"truncated or corrupt: {ffmpeg_cause(exc)}") from None
    finally:
        container.close()
    return sorted(set(times))


SCENE_THRESHOLD = 30.0  # mean absolute grey difference (0-255) of consecutive small frames
_SCENE_WIDTH = 64


def scene_cut_times(path: Path, threshold: float = SCENE_THRESHOLD, *, until: float | None = None) -> list[float]:
    """Times (s) of the first frame of each new scene.

    Every frame is decoded, scaled to 64 pixels wide in grey by FFmpeg, and compared with the one
    before; a cut is a difference above `threshold` that also stands out (3x) from the recent
    differences, so fast motion alone is not a cut.
    """
    import av

    container, stream = open_video(Path(path))
    cuts: list[float] = []
    try:
        stream.thread_type = "AUTO"
        tb, start = stream.time_base, stream_start(stream)
        width = stream.codec_context.width or _SCENE_WIDTH
        height = stream.codec_context.height or _SCENE_WIDTH
        small_h = max(2, round(_SCENE_WIDTH * height / max(1, width)))
        previous = None
        recent: list[float] = []
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float((frame.pts - start) * tb)
            if until is not None and t > until:
                break
            grey = frame.reformat(width=_SCENE_WIDTH, height=small_h, format="gray").to_ndarray()
            grey = grey.astype(np.float32)
            if previous is not None:
                diff = float(np.abs(grey - previous).mean())
                typical = float(np.mean(recent)) if recent else 0.0
                if diff > threshold and diff > 3.0 * typical:
                    cuts.append(round(t, 6))
                recent = (recent + [diff])[-8:]
            previous = grey
    except av.FFmpegError as exc:
        raise UnusableMedia(f"truncated or corrupt: {ffmpeg_cause(exc)}") from None
    finally:
        container.close()
    return cuts
