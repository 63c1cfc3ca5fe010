"""Probing (core/data/probe.py): what a file is, and one-line reasons for every file that is unusable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

import media_factory as mf
from core.data.media import UnusableMedia
from core.data.probe import keyframe_times, probe, scene_cut_times

MP4_CUT = "'mdat' box (a copy or download cut short); re-export or re-download it"  # core/data/mp4_boxes.py
BAD: dict[str, tuple[str, Callable[[Path], object], str]] = {
    # name: (file name, how to make it, words the reason must contain)
    "audio only": ("song.mp4", mf.make_audio_only, "has no video stream (audio only?)"),
    "random bytes": ("noise.mp4", mf.make_corrupt, "truncated or corrupt"),
    "random bytes as mkv": ("noise.mkv", mf.make_corrupt, "truncated or corrupt"),
    "random bytes as image": ("noise.png", mf.make_corrupt, "truncated or corrupt"),
    "empty file": ("empty.mp4", lambda p: p.write_bytes(b""), "empty"),
    "zero frames": ("empty.avi", mf.make_zero_frame_video, "no frames"),
    "nothing decodes": ("zeros.mp4", mf.make_undecodable_frames, "corrupt"),
    "unknown codec": ("odd.avi", mf.make_unsupported_codec, "unsupported codec: 'ZZZZ'"),
    "tiny frames": ("tiny.mkv", mf.make_tiny_video, "2x2 pixels, smaller than the 16-pixel minimum"),
    "huge frames": ("wide.mkv", mf.make_oversized_video, "8208x16 pixels, larger than the 8192-pixel limit"),
    "tiny image": ("dot.png", lambda p: mf.make_image(p, 8, 8), "8x8 pixels, smaller than"),
    "huge image": ("strip.png", lambda p: mf.make_image(p, 8200, 20), "8200x20 pixels, larger than"),
    "truncated, index first": ("cut.mp4", lambda p: mf.make_truncated(p, faststart=True), MP4_CUT),
    "truncated, index lost": ("cut2.mp4", lambda p: mf.make_truncated(p, faststart=False), MP4_CUT),
    "truncated tail mp4": ("tail.mp4", lambda p: mf.make_truncated(p, keyframe_interval=12, keep=0.8), MP4_CUT),
    "last frames cut mp4": ("end.mp4", lambda p: mf.make_truncated(p, keyframe_interval=12, keep=0.95), MP4_CUT),
    "truncated tail mkv": ("tail.mkv", lambda p: mf.make_truncated(p, keyframe_interval=12, keep=0.8), "truncated or corrupt"),
    "last frames cut mkv": ("end.mkv", lambda p: mf.make_truncated(p, keyframe_interval=12, keep=0.93), "truncated or corrupt"),
    "truncated webm": ("tail.webm", lambda p: mf.make_truncated(p, keyframe_interval=12, keep=0.85), "truncated or corrupt"),
    "missing file": ("gone.mp4", lambda p: None, "not found"),
    "a folder": ("folder.mp4", lambda p: p.mkdir(), "folder"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_unusable_media(tmp_path: Path, case: str) -> None:
    name, make, words = BAD[case]
    path = tmp_path / name
    make(path)
    with pytest.raises(UnusableMedia) as err:
        probe(path)
    reason = str(err.value)
    assert words in reason
    assert "\n" not in reason and 0 < len(reason) < 200
    assert str(tmp_path) not in reason  # the Issue line adds the path itself


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file(tmp_path: Path) -> None:
    path = mf.make_clip(tmp_path / "locked.mp4", seconds=0.5)
    path.chmod(0)
    try:
        with pytest.raises(UnusableMedia, match="permission denied"):
            probe(path)
    finally:
        path.chmod(0o644)


def test_permission_error_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = mf.make_clip(tmp_path / "locked.mp4", seconds=0.5)

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(UnusableMedia, match="cannot read the file: permission denied"):
        probe(path)


def test_plain_clip(tmp_path: Path) -> None:
    path = mf.make_clip(tmp_path / "a.mp4", width=96, height=64, fps=24.0, seconds=2.0)
    info = probe(path)
    assert (info.kind, info.width, info.height, info.rotation) == ("video", 96, 64, 0)
    assert info.fps == pytest.approx(24.0)
    assert info.duration == pytest.approx(2.0, abs=0.01)
    assert info.frame_count == 48
    assert info.codec == "h264"
    assert not info.variable_frame_rate
    assert info.size_bytes == path.stat().st_size and info.mtime_ns == path.stat().st_mtime_ns
    assert info.is_video and info.path == path


@pytest.mark.parametrize("name, kw", [
    ("a.mkv", {}), ("a.webm", {}), ("a.avi", {}), ("a.mov", {}), ("ntsc.mkv", {"fps": 30000 / 1001}),
    ("mjpeg.mkv", {"codec": "mjpeg"}), ("ffv1.mkv", {"codec": "ffv1"}),
])
def test_other_containers_and_codecs(tmp_path: Path, name: str, kw: dict) -> None:
    fps = kw.get("fps", 24.0)
    info = probe(mf.make_clip(tmp_path / name, **kw))
    assert (info.width, info.height) == (96, 64)
    assert info.fps == pytest.approx(fps, rel=1e-3)
    assert info.duration == pytest.approx(2.0, abs=0.05)
    assert abs(info.frame_count - round(2.0 * fps)) <= 1
    assert not info.variable_frame_rate


@pytest.mark.parametrize("rotation", [90, 180, 270])
@pytest.mark.parametrize("suffix", [".mp4", ".mov"])
def test_rotation_is_reported_with_display_size(tmp_path: Path, rotation: int, suffix: str) -> None:
    info = probe(mf.make_clip(tmp_path / f"r{suffix}", width=96, height=64, rotation=rotation, seconds=0.5))
    assert info.rotation == rotation
    assert (info.width, info.height) == (96, 64)  # the display size, whatever the stored one


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".mov"])
@pytest.mark.parametrize("fps", [24.0, 30000 / 1001])
def test_long_constant_rate_clips_with_b_frames_are_not_vfr(tmp_path: Path, suffix: str, fps: float) -> None:
    # More frames than the packets probe reads, with B-frames reordering them: not VFR.
    info = probe(mf.make_clip(tmp_path / f"c{suffix}", fps=fps, seconds=4.0))
    assert not info.variable_frame_rate


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate_is_flagged(tmp_path: Path, suffix: str) -> None:
    info = probe(mf.make_clip(tmp_path / f"v{suffix}", vfr=True, seconds=4.0))
    assert info.variable_frame_rate
    assert info.duration == pytest.approx(mf.frame_times(vfr=True, seconds=4.0)[-1], abs=0.1)


@pytest.mark.parametrize("suffix, codec", [(".png", "png"), (".jpg", "mjpeg"), (".jpeg", "mjpeg"), (".webp", "webp")])
def test_images(tmp_path: Path, suffix: str, codec: str) -> None:
    info = probe(mf.make_image(tmp_path / f"still{suffix}", 160, 96))
    assert (info.kind, info.width, info.height, info.rotation) == ("image", 160, 96, 0)
    assert (info.fps, info.duration, info.frame_count, info.codec) == (1.0, 0.0, 1, codec)
    assert not info.is_video


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm"])
def test_keyframe_times_follow_the_keyframe_interval(tmp_path: Path, suffix: str) -> None:
    path = mf.make_clip(tmp_path / f"k{suffix}", fps=24.0, seconds=3.0, keyframe_interval=12)
    assert keyframe_times(path) == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], abs=1e-3)
    assert keyframe_times(path, until=1.2) == pytest.approx([0.0, 0.5, 1.0], abs=1e-3)


def test_scene_cuts_are_found_within_a_frame(tmp_path: Path) -> None:
    cuts = (0.5, 1.25, 2.0)
    path = mf.make_clip(tmp_path / "s.mp4", seconds=3.0, scene_cuts=cuts, keyframe_interval=48)
    found = scene_cut_times(path)
    assert len(found) == len(cuts)
    for got, want in zip(found, cuts, strict=True):
        assert abs(got - want) <= 1 / 24 + 1e-6
    assert scene_cut_times(path, until=1.0) == pytest.approx([0.5], abs=1 / 24)


def test_no_scene_cuts_in_a_continuous_clip(tmp_path: Path) -> None:
    assert scene_cut_times(mf.make_clip(tmp_path / "c.mp4", seconds=2.0)) == []


def test_keyframe_and_scene_helpers_report_bad_files(tmp_path: Path) -> None:
    for make, name in ((mf.make_corrupt, "x.mp4"), (mf.make_audio_only, "y.mp4")):
        path = tmp_path / name
        make(path)
        with pytest.raises(UnusableMedia):
            keyframe_times(path)
        with pytest.raises(UnusableMedia):
            scene_cut_times(path)
