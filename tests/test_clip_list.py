"""core.data.clip_list and core.data.thumbnails: a folder as the dataset editor sees it (every media
file with its caption file or where one goes, problems mapped to the media file), the doctor's facts
merged in, and thumbnails cached by path, size and modification time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from media_factory import make_clip, make_corrupt

from core.config import resolve
from core.data.clip_list import list_clips, save_caption, with_report
from core.data.doctor import diagnose
from core.data.media import UnusableMedia
from core.data.thumbnails import ThumbnailCache


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "clips"
    root.mkdir()
    make_clip(root / "ok.mp4", width=96, height=64, fps=16, seconds=1.0)
    (root / "ok.txt").write_text("fine", encoding="utf-8")
    (root / "latin.mp4").write_bytes((root / "ok.mp4").read_bytes() + b"\0")  # another file, same frames
    (root / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.mp4").write_bytes((root / "ok.mp4").read_bytes() + b"\0\0")
    (root / "empty.txt").write_text("  \n", encoding="utf-8")
    (root / "bare.mp4").write_bytes((root / "ok.mp4").read_bytes() + b"\0\0\0")
    make_corrupt(root / "broken.mp4")
    (root / "broken.txt").write_text("broken", encoding="utf-8")
    (root / "orphan.txt").write_text("no clip", encoding="utf-8")
    return root


def test_every_media_file_is_listed_with_its_caption_problems(folder: Path) -> None:
    entries, rest = list_clips(folder)
    by_name = {e.path.name: e for e in entries}
    assert sorted(by_name) == ["bare.mp4", "broken.mp4", "empty.mp4", "latin.mp4", "ok.mp4"]
    assert by_name["ok.mp4"].has_caption and by_name["ok.mp4"].caption == "fine" and not by_name["ok.mp4"].problems
    assert not by_name["bare.mp4"].has_caption and by_name["bare.mp4"].caption_path == folder / "bare.txt"
    assert "no caption" in by_name["bare.mp4"].problem_text()
    assert "not UTF-8" in by_name["latin.mp4"].problem_text() and by_name["latin.mp4"].caption == "caf\ufffd"
    assert "empty caption" in by_name["empty.mp4"].problem_text() and not by_name["empty.mp4"].has_caption
    assert not by_name["broken.mp4"].problems, "discovery does not probe: the doctor finds it broken"
    assert [i.path.name for i in rest] == ["orphan.txt"]

    report = diagnose(resolve({"datasets": [{"path": str(folder)}]}))
    merged = {e.path.name: e for e in with_report(entries, report.files, report.issues)}
    assert merged["broken.mp4"].fatal
    assert merged["ok.mp4"].duration == pytest.approx(1.0, abs=0.07) and (merged["ok.mp4"].width, merged["ok.mp4"].height) == (96, 64)
    assert merged["ok.mp4"].bucket is not None
    assert len(merged["bare.mp4"].problems) == 1, "a problem both found is listed once"


def test_saving_a_caption_clears_its_caption_problems(folder: Path) -> None:
    entries, _ = list_clips(folder)
    latin = next(e for e in entries if e.path.name == "latin.mp4")
    saved = save_caption(latin, "  café au lait  ")
    assert (folder / "latin.txt").read_bytes() == "café au lait\n".encode()
    assert saved.has_caption and not saved.problems and saved.caption == "café au lait"


def test_thumbnails_are_cached_by_path_size_and_time(folder: Path, tmp_path: Path) -> None:
    cache = ThumbnailCache(tmp_path / "thumbs")
    assert cache.cached(folder / "ok.mp4") is None
    made = cache.get(folder / "ok.mp4")
    assert made.is_file() and cache.cached(folder / "ok.mp4") == made
    assert made.read_bytes()[:2] == b"\xff\xd8"  # a JPEG
    os.utime(folder / "ok.mp4", ns=(1, 1))
    assert cache.cached(folder / "ok.mp4") is None, "a changed file needs a new thumbnail"
    with pytest.raises(UnusableMedia):
        cache.get(folder / "broken.mp4")
    assert not list((tmp_path / "thumbs").rglob("*.tmp"))
