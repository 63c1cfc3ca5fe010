"""The demo dataset in resources/demo_dataset: captions, decodability, size, and that the
checked-in files are what resources/make_demo_dataset.py makes."""

from __future__ import annotations

import importlib.util
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "resources" / "demo_dataset"
SCRIPT = ROOT / "resources" / "make_demo_dataset.py"
MEDIA_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".png", ".jpg", ".jpeg", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi"}


def load_script():
    spec = importlib.util.spec_from_file_location("_vt_make_demo_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def spec():
    m = load_script()
    return m, {c.name: c for c in m.CLIPS}, {s.name: s for s in m.STILLS}


def media_files(folder: Path = DATASET) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in MEDIA_SUFFIXES)


def decode_video(path: Path) -> tuple[list[np.ndarray], av.video.stream.VideoStream]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream


def read_png(path: Path) -> np.ndarray:
    """Decode the 8-bit RGB, filter-0 PNGs that make_demo_dataset.py writes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 2), "expected 8-bit RGB"
            size = (w, h)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h = size
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w * 3 + 1)
    assert (raw[:, 0] == 0).all(), "expected filter type 0 on every row"
    return raw[:, 1:].reshape(h, w, 3)


def test_dataset_exists_with_a_readme():
    assert DATASET.is_dir()
    readme = (DATASET / "README.md").read_text(encoding="utf-8")
    assert "make_demo_dataset.py" in readme
    assert len([p for p in media_files() if p.suffix in VIDEO_SUFFIXES]) >= 4
    assert len([p for p in media_files() if p.suffix not in VIDEO_SUFFIXES]) >= 1


def test_every_media_file_has_a_caption_and_every_caption_a_media_file():
    media = media_files()
    for path in media:
        caption = path.with_suffix(".txt")
        assert caption.is_file(), f"{path.name} has no caption"
        text = caption.read_bytes().decode("utf-8").strip()  # raises if not UTF-8
        assert text, f"{caption.name} is empty"
        assert len(text.splitlines()) == 1
    stems = {p.stem for p in media}
    for caption in DATASET.glob("*.txt"):
        assert caption.stem in stems, f"{caption.name} captions nothing"


def test_captions_describe_what_is_visible():
    colours = {"red", "yellow", "green", "orange", "pink", "cyan", "purple", "blue", "grey", "black", "white"}
    shapes = {"circle", "square", "triangle", "diamond"}
    for caption in DATASET.glob("*.txt"):
        words = set(re.findall(r"[a-z]+", caption.read_text(encoding="utf-8").lower()))
        assert words & colours and words & shapes and "background" in words, caption.name
        assert not words & {"first", "then", "after", "before", "finally", "next", "later"}, caption.name


def test_files_match_the_script(spec):
    _, clips, stills = spec
    expected = {f"{n}.mp4" for n in clips} | {f"{n}.png" for n in stills}
    assert {p.name for p in media_files()} == expected
    for name, item in {**clips, **stills}.items():
        assert (DATASET / f"{name}.txt").read_text(encoding="utf-8").strip() == item.caption


def test_videos_decode_to_the_declared_size_and_length(spec):
    m, clips, _ = spec
    sizes = set()
    for name, clip in clips.items():
        frames, stream = decode_video(DATASET / f"{name}.mp4")
        assert len(frames) == clip.frames >= 17, name
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (clip.width, clip.height)
        assert all(f.shape == (clip.height, clip.width, 3) for f in frames), name
        assert float(stream.average_rate) == m.FPS == 16
        assert 2.0 <= clip.frames / m.FPS <= 3.0
        assert not all(np.array_equal(frames[0], f) for f in frames[1:]), f"{name} does not move"
        sizes.add((clip.width > clip.height) - (clip.width < clip.height))
    assert sizes == {-1, 0, 1}, "expected portrait, square and landscape clips"


def test_stills_have_the_declared_size(spec):
    _, _, stills = spec
    for name, still in stills.items():
        assert read_png(DATASET / f"{name}.png").shape == (still.height, still.width, 3)


def test_dataset_is_small():
    total = sum(p.stat().st_size for p in DATASET.rglob("*") if p.is_file())
    assert total < 600 * 1024, f"demo dataset is {total / 1024:.0f} KiB"


def test_checked_in_files_are_up_to_date(spec, tmp_path: Path):
    """Rebuild into a temp folder and compare pictures, not bytes: encoder builds differ."""
    m, clips, stills = spec
    m.build(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in DATASET.iterdir()} - {"README.md"}
    for name in clips:
        new, _ = decode_video(tmp_path / f"{name}.mp4")
        old, _ = decode_video(DATASET / f"{name}.mp4")
        assert len(new) == len(old)
        for a, b in zip(new, old):
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 3, f"{name} differs; rerun {SCRIPT.name}"
    for name in stills:
        assert np.array_equal(read_png(tmp_path / f"{name}.png"), read_png(DATASET / f"{name}.png"))
        assert (tmp_path / f"{name}.txt").read_bytes() == (DATASET / f"{name}.txt").read_bytes()
