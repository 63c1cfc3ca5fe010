"""Decoding one sample's frames by seeking (decode_frames) against decoding the whole file, in one run.

A 10 s 1280x720 H.264 clip at 24 fps (a keyframe every 2 s, textured moving content) is written
to a temporary folder. Each case is timed alternately with both methods, N times, and the ratio of
medians (whole file / decode_frames) is reported; both methods' frames are checked to be the same.

    python benchmarks/decode_seek.py [--runs 7] [--keyint 48]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import media_factory as mf  # noqa: E402

from core.data.decode import _assemble, decode_frames  # noqa: E402
from core.data.probe import probe  # noqa: E402

WIDTH, HEIGHT, FPS, SECONDS = 1280, 720, 24, 10.0


def make_clip(path: Path, keyint: int) -> Path:
    """Textured content that moves every frame (so P-frames cost something), with the factory's index bar."""
    import av

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8 * 2, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(texture, 8, axis=0), 8, axis=1)  # 8 px blocks: compressible but not flat
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast",
                          "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0"}
        for i in range(int(SECONDS * FPS)):
            img = np.ascontiguousarray(texture[:, i * 4:i * 4 + WIDTH])
            img[: HEIGHT // 4] = mf.draw_frame(i, WIDTH, HEIGHT)[: HEIGHT // 4]
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def decode_whole(path: Path, times: list[float]) -> np.ndarray:
    """The reference: decode every frame, keeping the nearest to each requested time as it goes.

    The picked frames are converted with the same code as decode_frames, so only decoding differs.
    """
    import av

    unique = sorted(set(times))
    best: list[tuple[float, object]] = [(float("inf"), None)] * len(unique)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = float(stream.time_base)
        for frame in container.decode(stream):
            t = frame.pts * tb
            best = [(abs(t - u), frame) if abs(t - u) < b[0] else b for u, b in zip(unique, best, strict=True)]
    return _assemble(times, unique, [frame for _, frame in best], 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--keyint", type=int, default=48, help="frames between keyframes (48 = 2 s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vt-bench-") as tmp:
        path = make_clip(Path(tmp) / "clip.mp4", args.keyint)
        info = probe(path)
        cases = {
            "window: 17 frames from 6 s": [6.0 + i / FPS for i in range(17)],
            "window: 17 frames from 0 s": [i / FPS for i in range(17)],
            "spread: 17 frames over 10 s": [float(i) / FPS for i in np.round(np.linspace(0, 239, 17))],
        }
        print(f"clip: {WIDTH}x{HEIGHT} H.264, {SECONDS:g} s at {FPS} fps, keyframe every {args.keyint} frames, "
              f"{path.stat().st_size / 1e6:.1f} MB; {args.runs} alternating runs per case")
        print(f"{'case':32} {'decode_frames s':>16} {'frames':>7} {'whole file s':>13} {'ratio':>7}")
        for name, times in cases.items():
            seek_t, whole_t = [], []
            stats: dict[str, int] = {}
            for _ in range(args.runs):
                start = time.perf_counter()
                a = decode_frames(path, times, info, stats=stats)
                seek_t.append(time.perf_counter() - start)
                start = time.perf_counter()
                b = decode_whole(path, times)
                whole_t.append(time.perf_counter() - start)
                if not np.array_equal(a, b):
                    raise SystemExit(f"{name}: the two methods returned different frames")
            expected = [round(t * FPS) for t in times]
            assert [mf.frame_index_of(f) for f in a] == expected, name
            ms, mw = statistics.median(seek_t), statistics.median(whole_t)
            print(f"{name:32} {ms:16.3f} {stats['decoded']:7d} {mw:13.3f} {mw / ms:7.2f}")


if __name__ == "__main__":
    main()
