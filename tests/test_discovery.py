"""Discovery: both layouts, every caption problem, links, loops and unreadable folders."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from core.config import defaults
from core.data.discovery import discover, discover_datasets


def _media(path: Path, caption: str | bytes | None = None) -> Path:
    """A stand-in media file (discovery reads no media) with an optional caption beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not probed here")
    if caption is not None:
        cap = path.with_suffix(".txt")
        cap.write_bytes(caption if isinstance(caption, bytes) else caption.encode("utf-8"))
    return path


def _reasons(issues) -> dict[str, str]:
    return {str(i.path): i.reason for i in issues}


def test_captions_beside_media_recursively(tmp_path: Path) -> None:
    _media(tmp_path / "b.mp4", "second")
    _media(tmp_path / "a.MOV", "first")
    _media(tmp_path / "deep" / "er" / "c.JPG", "  a still \n")
    _media(tmp_path / "d.webp", "image")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "clip.srt").write_text("ignored", encoding="utf-8")
    items, issues = discover(tmp_path, dataset_index=2, repeats=3)
    assert issues == []
    assert [i.relative_path for i in items] == ["a.MOV", "b.mp4", "d.webp", "deep/er/c.JPG"]
    assert [i.kind for i in items] == ["video", "video", "image", "image"]
    assert items[3].caption == "a still"
    assert items[3].caption_path == tmp_path / "deep" / "er" / "c.txt"
    assert {(i.dataset_index, i.repeats, i.root) for i in items} == {(2, 3, tmp_path)}


def test_videos_and_images_beside_captions(tmp_path: Path) -> None:
    _media(tmp_path / "videos" / "v1.mp4")
    _media(tmp_path / "videos" / "sub" / "v2.mkv")
    _media(tmp_path / "videos" / "v3.webm")
    _media(tmp_path / "images" / "i1.png")
    (tmp_path / "captions" / "sub").mkdir(parents=True)
    (tmp_path / "captions" / "v1.txt").write_text("one", encoding="utf-8")
    (tmp_path / "captions" / "sub" / "v2.TXT").write_text("two", encoding="utf-8")
    (tmp_path / "captions" / "i1.txt").write_text("image one", encoding="utf-8")
    _media(tmp_path / "loose.mp4", "loose one")  # the root itself still pairs side by side
    items, issues = discover(tmp_path)
    assert [(i.relative_path, i.caption) for i in items] == [
        ("images/i1.png", "image one"),
        ("loose.mp4", "loose one"),
        ("videos/sub/v2.mkv", "two"),
        ("videos/v1.mp4", "one"),
    ]
    assert _reasons(issues) == {str(tmp_path / "videos" / "v3.webm"): "no caption: expected captions/v3.txt"}


def test_caption_problems_each_get_one_line(tmp_path: Path) -> None:
    _media(tmp_path / "good.mp4", "\ufeffa fox at dawn")  # a UTF-8 byte order mark is fine
    _media(tmp_path / "missing.mp4")
    _media(tmp_path / "empty.mp4", "")
    _media(tmp_path / "blank.png", " \n\t ")
    _media(tmp_path / "latin1.mp4", "café".encode("latin-1"))
    (tmp_path / "orphan.txt").write_text("no media of this name", encoding="utf-8")
    items, issues = discover(tmp_path)
    assert [(i.path.name, i.caption) for i in items] == [("good.mp4", "a fox at dawn")]
    reasons = _reasons(issues)
    assert reasons[str(tmp_path / "missing.mp4")] == "no caption: expected missing.txt"
    assert reasons[str(tmp_path / "empty.txt")].startswith("empty caption")
    assert reasons[str(tmp_path / "blank.txt")].startswith("empty caption")
    assert "not UTF-8" in reasons[str(tmp_path / "latin1.txt")] and "re-save it as UTF-8" in reasons[str(tmp_path / "latin1.txt")]
    orphan = [i for i in issues if i.path.name == "orphan.txt"]
    assert len(orphan) == 1 and not orphan[0].fatal  # a warning, not a failure
    assert all(i.fatal for i in issues if i.path.name != "orphan.txt")
    assert all("\n" not in str(i) for i in issues)


def test_hidden_files_and_folders_are_ignored(tmp_path: Path) -> None:
    _media(tmp_path / ".hidden" / "x.mp4")  # no caption, but hidden: no issue either
    _media(tmp_path / ".y.mp4")
    _media(tmp_path / "z.mp4", "zed")
    items, issues = discover(tmp_path)
    assert [i.path.name for i in items] == ["z.mp4"] and issues == []


def test_links_are_followed_and_loops_reported_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    _media(data / "a.mp4", "a")
    _media(elsewhere / "b.mp4", "b")
    (data / "linked").symlink_to(elsewhere, target_is_directory=True)
    (data / "sub").mkdir()
    (data / "sub" / "back").symlink_to(data, target_is_directory=True)  # a loop
    (data / "sub" / "self").symlink_to(data / "sub" / "self")  # a link to itself
    _media(elsewhere / "c.txt.real", None)
    (data / "c.mp4").symlink_to(elsewhere / "c.txt.real")
    (data / "c.txt").write_text("c", encoding="utf-8")
    (data / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    items, issues = discover(data)
    assert [i.relative_path for i in items] == ["a.mp4", "c.mp4", "linked/b.mp4"]
    loops = [i for i in issues if "symlink loop" in i.reason]
    assert sorted(i.path.name for i in loops) == ["back", "self"]
    assert "leads back to" in next(i.reason for i in loops if i.path.name == "back")
    assert _reasons(issues)[str(data / "gone.mp4")] == "broken link: its target does not exist"


def test_a_second_link_to_a_scanned_folder_does_not_duplicate(tmp_path: Path) -> None:
    _media(tmp_path / "real" / "a.mp4", "a")
    (tmp_path / "zlink").symlink_to(tmp_path / "real", target_is_directory=True)
    items, issues = discover(tmp_path)
    assert [i.relative_path for i in items] == ["real/a.mp4"]
    assert len(issues) == 1 and not issues[0].fatal


def test_unreadable_folder_is_skipped_with_an_issue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _media(tmp_path / "ok" / "a.mp4", "a")
    locked = tmp_path / "locked"
    _media(locked / "b.mp4", "b")
    real_scandir = os.scandir

    # chmod 000 does not stop root (tests often run as root), so the refusal is simulated as well.
    def scandir(path):  # type: ignore[no-untyped-def]
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items, issues = discover(tmp_path)
    assert [i.relative_path for i in items] == ["ok/a.mp4"]
    assert _reasons(issues) == {str(locked): "folder cannot be read (permission denied); skipped - check its permissions"}


def test_dataset_paths_that_are_not_folders(tmp_path: Path) -> None:
    items, issues = discover(tmp_path / "nope")
    assert items == [] and len(issues) == 1 and "does not exist" in issues[0].reason and issues[0].fatal
    file = _media(tmp_path / "a.mp4")
    assert "is not a folder" in discover(file)[1][0].reason


def test_discover_datasets_uses_each_dataset_with_its_repeats(tmp_path: Path) -> None:
    _media(tmp_path / "one" / "a.mp4", "a")
    _media(tmp_path / "two" / "b.png", "b")
    config = defaults()
    config["datasets"] = [
        {"path": str(tmp_path / "one"), "repeats": 1},
        {"path": str(tmp_path / "two"), "repeats": 5},
        {"path": "", "repeats": 1},
        {"path": str(tmp_path / "three"), "repeats": 1},
    ]
    items, issues = discover_datasets(config)
    assert [(i.path.name, i.dataset_index, i.repeats) for i in items] == [("a.mp4", 0, 1), ("b.png", 1, 5)]
    assert [str(i.path) for i in issues] == ["datasets[2]", str(tmp_path / "three")]
    assert all(i.fatal for i in issues)


def test_large_folder_is_fast_and_deterministic(tmp_path: Path) -> None:
    for d in range(20):
        folder = tmp_path / f"d{d:02}"
        folder.mkdir()
        for n in range(100):
            (folder / f"c{n:03}.mp4").write_bytes(b"")
            (folder / f"c{n:03}.txt").write_text("x", encoding="utf-8")
    start = time.perf_counter()
    items, issues = discover(tmp_path)
    elapsed = time.perf_counter() - start
    assert len(items) == 2000 and issues == []
    assert [i.path for i in items] == sorted(i.path for i in items)
    assert discover(tmp_path)[0] == items
    assert elapsed < 5.0
