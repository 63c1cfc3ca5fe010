"""Small, deterministic test media written with PyAV: clips whose frames say which frame they are.

Every clip frame (in display orientation, `width` x `height`) has this layout:

- the top quarter is a bar of `NBITS + 2` cells: a white sentinel, the frame index as a Gray code
  (MSB first, white = 1), a black sentinel. A Gray code changes one cell per frame, so consecutive
  frames differ little and only scene cuts look like cuts.
- the rest is the scene's background colour (scene `k` = the k-th entry of SCENE_COLOURS; the scene
  changes at each time in `scene_cuts`).
- a red square in the bottom-left corner, so a test can tell an upright frame from a turned one.

`frame_index_of(rgb)` reads the index back, `marker_corner(rgb)` says where the red square is, and
`frame_times(...)` gives the presentation time of each frame the factory writes.
"""

from __future__ import annotations

import os
import random
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

NBITS = 10  # up to 1024 frames: 10 s at 60 fps, 40 s at 24 fps
SCENE_COLOURS = ((40, 40, 40), (200, 200, 200), (30, 90, 200), (220, 160, 40), (60, 180, 80))
MARKER = (230, 20, 20)

_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}
_DEFAULT_CODECS = {".webm": "libvpx-vp9", ".avi": "mpeg4"}


# ---------------------------------------------------------------- frame content

def _gray(i: int) -> int:
    return i ^ (i >> 1)


def _from_gray(g: int) -> int:
    i = 0
    while g:
        i ^= g
        g >>= 1
    return i


def draw_frame(index: int, width: int, height: int, scene: int = 0) -> np.ndarray:
    """The display-orientation RGB picture of frame `index` (uint8, height x width x 3)."""
    img = np.empty((height, width, 3), np.uint8)
    img[:] = SCENE_COLOURS[scene % len(SCENE_COLOURS)]
    bar_h = max(1, height // 4)
    cells = NBITS + 2
    code = _gray(index)
    for c in range(cells):
        x0, x1 = c * width // cells, (c + 1) * width // cells
        if c == 0:
            on = True
        elif c == cells - 1:
            on = False
        else:
            on = bool((code >> (NBITS - c)) & 1)
        img[:bar_h, x0:x1] = 255 if on else 0
    m = max(1, min(width, height) // 4)
    img[height - m:, :m] = MARKER
    return img


def frame_index_of(rgb: np.ndarray) -> int:
    """Read back the frame index drawn by `draw_frame` (raises ValueError when the bar is not there)."""
    h, w = rgb.shape[:2]
    grey = rgb.astype(np.float32).mean(axis=2)
    bar_h = max(1, h // 4)
    y0, y1 = bar_h // 4, max(bar_h // 4 + 1, bar_h - bar_h // 4)
    cells = NBITS + 2
    bits = []
    for c in range(cells):
        x0, x1 = c * w // cells, (c + 1) * w // cells
        inset = (x1 - x0) // 4  # read the middle of a cell: edges blur under compression and scaling
        bits.append(grey[y0:y1, x0 + inset:max(x0 + inset + 1, x1 - inset)].mean() > 128)
    if not bits[0] or bits[-1]:
        raise ValueError("no frame-index bar at the top of this frame (turned or not a factory frame?)")
    code = 0
    for b in bits[1:-1]:
        code = (code << 1) | int(b)
    return _from_gray(code)


def marker_corner(rgb: np.ndarray) -> str:
    """Which corner holds the red marker: 'bottom-left' for an upright frame."""
    h, w = rgb.shape[:2]
    m = max(1, min(h, w) // 8)
    corners = {
        "top-left": rgb[:m, :m],
        "top-right": rgb[:m, w - m:],
        "bottom-left": rgb[h - m:, :m],
        "bottom-right": rgb[h - m:, w - m:],
    }

    def redness(a: np.ndarray) -> float:
        a = a.astype(np.float32)
        return float((a[..., 0] - (a[..., 1] + a[..., 2]) / 2).mean())

    return max(corners, key=lambda k: redness(corners[k]))


def frame_times(*, fps: float = 24.0, seconds: float = 2.0, vfr: bool = False) -> list[float]:
    """Presentation times (s) of the frames make_clip writes with these settings.

    VFR clips alternate short and long gaps drawn from a fixed generator (average about 1/fps),
    on a 1 ms grid, so their times are exact in a 1/1000 time base.
    """
    n = max(1, round(seconds * fps))
    if not vfr:
        return [i / fps for i in range(n)]
    rng = random.Random(1234)
    base_ms = 1000.0 / fps
    times, t = [], 0
    for i in range(n):
        times.append(t / 1000.0)
        factor = 0.5 if i % 2 == 0 else 1.5
        t += max(2, round(base_ms * factor * rng.uniform(0.9, 1.1)))
    return times


# ---------------------------------------------------------------- writers

def make_clip(
    path: str | os.PathLike,
    *,
    width: int = 96,
    height: int = 64,
    fps: float = 24.0,
    seconds: float = 2.0,
    keyframe_interval: int | None = None,
    rotation: int = 0,
    vfr: bool = False,
    scene_cuts: Sequence[float] = (),
    codec: str | None = None,
    crf: int = 10,
    faststart: bool = False,
    bframes: bool = True,
    container_format: str | None = None,
) -> Path:
    """Write a clip of `round(seconds * fps)` factory frames and return its path.

    width/height are the display size; with `rotation` (clockwise degrees, 0/90/180/270) the stored
    frames are turned the other way and the stream carries a display matrix, as phones do.
    `keyframe_interval` (frames) fixes the GOP and turns off x264's scene-cut keyframes; None keeps
    the encoder's defaults. The container comes from the suffix (.mp4 .mov .mkv .webm .avi) unless
    `container_format` says otherwise; the codec defaults to libx264 (VP9 for .webm, MPEG-4 for .avi).
    """
    import av

    path = Path(path)
    suffix = path.suffix.lower()
    fmt = container_format or _FORMATS.get(suffix, "mp4")
    codec = codec or _DEFAULT_CODECS.get(suffix, "libx264")
    if rotation % 90 or rotation not in (0, 90, 180, 270):
        raise ValueError(f"rotation must be 0, 90, 180 or 270, not {rotation}")
    stored_w, stored_h = (height, width) if rotation in (90, 270) else (width, height)
    times = frame_times(fps=fps, seconds=seconds, vfr=vfr)
    cuts = sorted(scene_cuts)

    options: dict[str, str] = {}
    if fmt in ("mp4", "mov"):
        # bitexact keeps library version strings out, so the bytes are stable for one FFmpeg build.
        options["fflags"] = "+bitexact"
        if faststart:
            options["movflags"] = "+faststart"
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=fmt, options=options) as out:
        rate = Fraction(fps).limit_denominator(1001)
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = stored_w, stored_h
        stream.pix_fmt = "yuv420p" if codec not in ("mjpeg",) else "yuvj420p"
        if vfr:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        opts: dict[str, str] = {"threads": "1"}
        if codec == "libx264":
            opts.update({"crf": str(crf), "preset": "veryfast"})
            params = [] if bframes else ["bframes=0"]
            if keyframe_interval:
                params += [f"keyint={keyframe_interval}", f"min-keyint={keyframe_interval}", "scenecut=0"]
            if params:
                opts["x264-params"] = ":".join(params)
        elif codec in ("libvpx-vp9", "libvpx"):
            opts.update({"crf": str(max(crf, 4)), "b": "0", "deadline": "realtime", "cpu-used": "8"})
        elif codec in ("mpeg4", "mjpeg"):
            opts["qscale"] = "2"
        if keyframe_interval and codec != "libx264":
            stream.codec_context.gop_size = keyframe_interval
        stream.options = opts
        if rotation:
            stream.set_display_rotation(-rotation)  # PyAV takes counter-clockwise degrees

        for i, t in enumerate(times):
            scene = sum(1 for c in cuts if t >= c - 1e-9)
            img = draw_frame(i, width, height, scene)
            if rotation:
                img = np.ascontiguousarray(np.rot90(img, k=rotation // 90))  # undone by a clockwise turn
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if vfr:
                frame.pts = round(t * 1000)
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def make_image(path: str | os.PathLike, width: int = 96, height: int = 64, index: int = 0) -> Path:
    """Write a factory frame as an image; the format comes from the suffix (.png .jpg .jpeg .webp)."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(draw_frame(index, width, height), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(path.suffix.lower() or ".png", bgr)
    if not ok:
        raise RuntimeError(f"OpenCV cannot write {path.suffix} images")
    path.write_bytes(data.tobytes())
    return path


def make_audio_only(path: str | os.PathLike, seconds: float = 1.0) -> Path:
    """An .mp4 (or other container by suffix) with one AAC audio stream and no video."""
    import av

    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower(), "mp4")
    rate = 16000
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        samples = np.sin(np.arange(int(seconds * rate), dtype=np.float32) * 0.05).astype(np.float32)
        chunk = 1024
        for start in range(0, len(samples), chunk):
            part = samples[start:start + chunk]
            frame = av.AudioFrame.from_ndarray(part[None, :], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def make_truncated(path: str | os.PathLike, *, faststart: bool = True, keep: float = 0.5, **clip: object) -> Path:
    """A valid clip cut to `keep` of its bytes.

    With faststart the index (moov) is at the front, so the file still opens and claims all its
    frames: only reading the later part shows the damage. Without it the index is lost.
    """
    path = Path(path)
    clip.setdefault("seconds", 3.0)
    make_clip(path, faststart=faststart, **clip)  # type: ignore[arg-type]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_corrupt(path: str | os.PathLike, size: int = 4096) -> Path:
    """Random bytes (fixed seed) under a video extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(7).randbytes(size))
    return path


def make_zero_frame_video(path: str | os.PathLike) -> Path:
    """An AVI container with an MPEG-4 video stream and no packets (mp4 and mkv drop such a track)."""
    import av

    path = Path(path)
    with av.open(str(path), "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=24)
        stream.width, stream.height = 96, 64
        stream.pix_fmt = "yuv420p"
        out.start_encoding()
    return path


def make_undecodable_frames(path: str | os.PathLike) -> Path:
    """An mp4 whose index promises frames but whose sample data is all zero bytes: nothing decodes."""
    path = Path(path)
    make_clip(path, seconds=1.0, faststart=True)
    data = bytearray(path.read_bytes())
    at = data.find(b"mdat")
    if at < 0:
        raise RuntimeError("no mdat box in the clip")
    data[at + 4:] = bytes(len(data) - at - 4)
    path.write_bytes(bytes(data))
    return path


def make_unsupported_codec(path: str | os.PathLike) -> Path:
    """An AVI whose stream's FourCC is 'ZZZZ', a codec FFmpeg does not know."""
    path = Path(path)
    make_clip(path, seconds=0.5, codec="mpeg4", container_format="avi")
    data = path.read_bytes()
    if data.count(b"FMP4") < 1:
        raise RuntimeError("the AVI writer did not tag the stream FMP4")
    path.write_bytes(data.replace(b"FMP4", b"ZZZZ"))
    return path


def make_tiny_video(path: str | os.PathLike, size: int = 2) -> Path:
    """A clip of `size` x `size` pixel frames (FFV1 in Matroska: no encoder minimum)."""
    import av

    path = Path(path)
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("ffv1", rate=24)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(6):
            img = np.full((size, size, 3), i * 40, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def make_oversized_video(path: str | os.PathLike, width: int = 8208, height: int = 16) -> Path:
    """A short clip wider than the 8192-pixel limit (FFV1 in Matroska, so it is cheap)."""
    import av

    path = Path(path)
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("ffv1", rate=24)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for _ in range(2):
            img = np.zeros((height, width, 3), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path
