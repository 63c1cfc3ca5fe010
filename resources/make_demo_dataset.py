"""Build the tiny demo dataset in resources/demo_dataset/.

    python resources/make_demo_dataset.py [--out DIR]

Six short H.264 clips (16 fps, yuv420p, mixed aspect ratios) of coloured shapes
moving on plain or gradient backgrounds, and two still PNG images, each with a
caption .txt of the same stem next to it. Everything is computed from closed-form
formulas (no randomness), so running the script again gives the same pictures.

Frames are drawn with numpy using signed distance functions, with a one-pixel soft
edge for anti-aliasing. H.264 is written with PyAV + libx264; OpenCV's bundled
FFmpeg cannot encode H.264.
"""

from __future__ import annotations

import argparse
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

FPS = 16
CRF = 28  # small files; the clips are flat colours, so artefacts are mild
DEFAULT_OUT = Path(__file__).resolve().parent / "demo_dataset"

# ---------------------------------------------------------------- drawing helpers

Color = tuple[int, int, int]


def _grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres, so shapes are placed symmetrically.
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs + 0.5, ys + 0.5


def solid(w: int, h: int, color: Color) -> np.ndarray:
    img = np.empty((h, w, 3), np.float32)
    img[:] = color
    return img


def gradient(w: int, h: int, top: Color, bottom: Color, horizontal: bool = False) -> np.ndarray:
    t = np.linspace(0.0, 1.0, w if horizontal else h, dtype=np.float32)
    t = t[None, :, None] if horizontal else t[:, None, None]
    img = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return np.broadcast_to(img, (h, w, 3)).copy()


def paint(img: np.ndarray, sdf: np.ndarray, color: Color) -> None:
    """Blend `color` where the signed distance is negative (inside), soft 1 px edge."""
    cover = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
    img *= 1.0 - cover
    img += cover * np.asarray(color, np.float32)


def sdf_circle(xs, ys, cx, cy, r):
    return np.hypot(xs - cx, ys - cy) - r


def sdf_box(xs, ys, cx, cy, half, angle=0.0):
    # Rotate the sample points into the box frame, then the usual box distance.
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = xs - cx, ys - cy
    lx, ly = c * dx + s * dy, -s * dx + c * dy
    qx, qy = np.abs(lx) - half, np.abs(ly) - half
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    inside = np.minimum(np.maximum(qx, qy), 0)
    return outside + inside


def sdf_polygon(xs, ys, pts):
    """Distance to a convex polygon given counter-clockwise (in screen space: y down) points.
    Max of the edge half-plane distances: exact inside, close enough outside for a 1 px edge."""
    d = np.full(xs.shape, -np.inf, np.float32)
    n = len(pts)
    for i in range(n):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % n]
        ex, ey = x1 - x0, y1 - y0
        length = math.hypot(ex, ey)
        # Outward normal for clockwise-on-screen winding.
        nx, ny = ey / length, -ex / length
        d = np.maximum(d, (xs - x0) * nx + (ys - y0) * ny)
    return d


def regular_polygon(cx, cy, r, n, angle):
    """Vertices of a regular n-gon; angle in radians, positive = clockwise on screen."""
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n - math.pi / 2),
         cy + r * math.sin(angle + 2 * math.pi * k / n - math.pi / 2))
        for k in range(n)
    ]


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the clips

@dataclass(frozen=True)
class Clip:
    name: str
    width: int
    height: int
    frames: int
    caption: str
    draw: Callable[[int, int, float], np.ndarray]  # (w, h, t in [0, 1]) -> float RGB image


def _red_circle(w, h, t):
    img = solid(w, h, (18, 28, 84))
    xs, ys = _grid(w, h)
    r = 16
    cx = r + 8 + t * (w - 2 * r - 16)
    paint(img, sdf_circle(xs, ys, cx, h / 2, r), (220, 40, 40))
    return img


def _yellow_square(w, h, t):
    img = solid(w, h, (128, 128, 128))
    xs, ys = _grid(w, h)
    half = 14
    # Two full bounces: |sin| gives a floor contact with a sharp turn, like a ball.
    lift = abs(math.sin(2 * math.pi * t))
    cy = (h - half - 6) - lift * (h - 2 * half - 12)
    paint(img, sdf_box(xs, ys, w / 2, cy, half), (245, 210, 30))
    return img


def _green_triangle(w, h, t):
    img = solid(w, h, (236, 236, 230))
    xs, ys = _grid(w, h)
    angle = t * 2 * math.pi * 0.75  # three quarters of a turn, clockwise on screen
    pts = regular_polygon(w / 2, h / 2, 40, 3, angle)
    paint(img, sdf_polygon(xs, ys, pts), (40, 160, 60))
    return img


def _orange_square_pulse(w, h, t):
    img = gradient(w, h, (88, 40, 120), (10, 8, 20))
    xs, ys = _grid(w, h)
    half = 14 + 12 * (0.5 - 0.5 * math.cos(2 * math.pi * t))  # grows, then shrinks
    paint(img, sdf_box(xs, ys, w / 2, h / 2, half), (250, 140, 30))
    return img


def _two_circles_orbit(w, h, t):
    img = solid(w, h, (6, 6, 6))
    xs, ys = _grid(w, h)
    a = 2 * math.pi * t
    rx, ry = 40, 22
    for phase, color in ((0.0, (255, 105, 180)), (math.pi, (40, 220, 230))):
        cx = w / 2 + rx * math.cos(a + phase)
        cy = h / 2 + ry * math.sin(a + phase)
        paint(img, sdf_circle(xs, ys, cx, cy, 12), color)
    return img


def _purple_diamond(w, h, t):
    img = gradient(w, h, (170, 230, 170), (30, 150, 150), horizontal=True)
    xs, ys = _grid(w, h)
    half = 13
    m = half * math.sqrt(2) + 6  # half-diagonal plus a margin, so it never touches the edge
    cx = m + t * (w - 2 * m)
    cy = m + t * (h - 2 * m)
    paint(img, sdf_box(xs, ys, cx, cy, half, angle=math.pi / 4), (120, 40, 170))
    return img


CLIPS: tuple[Clip, ...] = (
    Clip("clip_01_red_circle", 160, 96, 48,
         "a red circle moving from left to right on a dark blue background", _red_circle),
    Clip("clip_02_yellow_square", 96, 160, 40,
         "a yellow square bouncing up and down on a plain grey background", _yellow_square),
    Clip("clip_03_green_triangle", 128, 128, 48,
         "a green triangle rotating clockwise in the centre of an off-white background",
         _green_triangle),
    Clip("clip_04_orange_square", 128, 128, 40,
         "an orange square growing and shrinking in the centre of a dark purple to black "
         "vertical gradient background", _orange_square_pulse),
    Clip("clip_05_two_circles", 160, 96, 48,
         "a pink circle and a cyan circle orbiting each other on a black background",
         _two_circles_orbit),
    Clip("clip_06_purple_diamond", 96, 160, 40,
         "a purple diamond sliding diagonally from the top left to the bottom right over a "
         "light green to teal horizontal gradient background", _purple_diamond),
)


@dataclass(frozen=True)
class Still:
    name: str
    width: int
    height: int
    caption: str
    draw: Callable[[int, int], np.ndarray]


def _still_circle_square(w, h):
    img = solid(w, h, (18, 28, 84))
    xs, ys = _grid(w, h)
    paint(img, sdf_circle(xs, ys, w * 0.3, h / 2, 20), (220, 40, 40))
    paint(img, sdf_box(xs, ys, w * 0.7, h / 2, 18), (245, 210, 30))
    return img


def _still_triangle(w, h):
    img = solid(w, h, (200, 200, 200))
    xs, ys = _grid(w, h)
    paint(img, sdf_polygon(xs, ys, regular_polygon(w / 2, h / 2 + 6, 38, 3, 0.0)), (40, 160, 60))
    return img


STILLS: tuple[Still, ...] = (
    Still("image_01_circle_and_square", 128, 128,
          "a red circle and a yellow square side by side on a dark blue background",
          _still_circle_square),
    Still("image_02_green_triangle", 160, 96,
          "a green triangle pointing up in the centre of a light grey background",
          _still_triangle),
)


# ---------------------------------------------------------------- writers

def write_mp4(path: Path, clip: Clip) -> None:
    import av  # imported here so the module (and its CLIPS table) loads without PyAV

    # bitexact keeps FFmpeg version strings out of the file, so reruns are byte-stable
    # with the same libraries.
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height = clip.width, clip.height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(CRF), "preset": "slow", "threads": "1"}
        for i in range(clip.frames):
            t = i / (clip.frames - 1)
            rgb = to_uint8(clip.draw(clip.width, clip.height, t))
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):  # flush delayed frames
            out.mux(packet)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Minimal PNG writer (8-bit RGB), so stills need nothing beyond numpy."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def build(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for clip in CLIPS:
        media = out_dir / f"{clip.name}.mp4"
        write_mp4(media, clip)
        (out_dir / f"{clip.name}.txt").write_text(clip.caption + "\n", encoding="utf-8")
        written.append(media)
    for still in STILLS:
        media = out_dir / f"{still.name}.png"
        write_png(media, to_uint8(still.draw(still.width, still.height)))
        (out_dir / f"{still.name}.txt").write_text(still.caption + "\n", encoding="utf-8")
        written.append(media)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = ap.parse_args()
    files = build(args.out)
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    for f in files:
        print(f"{f.name:40s} {f.stat().st_size / 1024:6.1f} KiB")
    print(f"total {total / 1024:.1f} KiB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
