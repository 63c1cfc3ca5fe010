"""Decoding by seeking (core/data/decode.py): the right frames, upright, and only as many as needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import media_factory as mf
from core.data.decode import decode_frames, fit_to_bucket
from core.data.media import UnusableMedia
from core.data.probe import probe


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """8 s clips at 24 fps with a keyframe every second, in each container."""
    d = tmp_path_factory.mktemp("long")
    return {s: mf.make_clip(d / f"long{s}", seconds=8.0, keyframe_interval=24) for s in (".mp4", ".mkv", ".webm", ".avi", ".mov")}


def read_indices(frames: np.ndarray) -> list[int]:
    return [mf.frame_index_of(f) for f in frames]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm", ".avi", ".mov"])
def test_window_is_exact_and_partial(long_clips: dict[str, Path], suffix: str) -> None:
    path = long_clips[suffix]
    info = probe(path)
    times = [6.0 + i / 24 for i in range(17)]
    stats: dict[str, int] = {}
    frames = decode_frames(path, times, info, stats=stats)
    assert frames.shape == (17, 64, 96, 3) and frames.dtype == np.uint8
    assert read_indices(frames) == list(range(144, 161))
    assert stats["seeks"] >= 1
    assert stats["decoded"] <= 17 + 8  # the window and the decoder's delay, not the 144 frames before it


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".avi"])
def test_spread_times_pick_nearest_frames(long_clips: dict[str, Path], suffix: str) -> None:
    path = long_clips[suffix]
    times = [i * 0.45 for i in range(17)]
    frames = decode_frames(path, times, probe(path))
    assert read_indices(frames) == [round(t * 24) for t in times]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_single_frames_around_keyframes(long_clips: dict[str, Path], suffix: str) -> None:
    # MP4 seeks by decode time: with B-frames a seek just before a keyframe lands on it, one frame late,
    # unless decode_frames notices and seeks again.
    path = long_clips[suffix]
    info = probe(path)
    for index in [k * 24 + d for k in (3, 5, 7) for d in (-2, -1, 0, 1)]:
        assert read_indices(decode_frames(path, [index / 24], info)) == [index]


def test_far_apart_times_seek_instead_of_decoding_through(long_clips: dict[str, Path]) -> None:
    path = long_clips[".mp4"]
    stats: dict[str, int] = {}
    frames = decode_frames(path, [0.0, 7.5], probe(path), stats=stats)
    assert read_indices(frames) == [0, 180]
    assert stats["seeks"] == 1
    assert stats["decoded"] < 40  # frame 0, then from the keyframe at 7 s


def test_order_and_repeats_are_kept(long_clips: dict[str, Path]) -> None:
    path = long_clips[".mp4"]
    times = [7.9, 0.0, 3.3, 3.3, 1 / 24]
    frames = decode_frames(path, times, probe(path))
    assert read_indices(frames) == [round(t * 24) for t in times]


def test_times_between_frames_take_the_nearest(long_clips: dict[str, Path]) -> None:
    path = long_clips[".mkv"]
    # 10 / 24 + a third of a frame -> frame 10; + two thirds -> frame 11.
    times = [(10 + 1 / 3) / 24, (10 + 2 / 3) / 24, 4.0 + 0.2 / 24]
    assert read_indices(decode_frames(path, times, probe(path))) == [10, 11, 96]


def test_default_keyframe_interval_clip(tmp_path: Path) -> None:
    # x264's default GOP (250 frames) covers this whole clip: decode still lands on the right frames.
    path = mf.make_clip(tmp_path / "d.mp4", seconds=4.0)
    times = [3.0 + i / 24 for i in range(9)]
    assert read_indices(decode_frames(path, times, probe(path))) == list(range(72, 81))


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_clips_decode_upright(tmp_path: Path, rotation: int) -> None:
    path = mf.make_clip(tmp_path / "r.mp4", width=96, height=64, rotation=rotation, seconds=1.0)
    info = probe(path)
    frames = decode_frames(path, [0.0, 0.5], info)
    assert frames.shape == (2, 64, 96, 3)  # display size
    assert read_indices(frames) == [0, 12]
    assert {mf.marker_corner(f) for f in frames} == {"bottom-left"}


def test_variable_frame_rate_by_timestamp(tmp_path: Path) -> None:
    path = mf.make_clip(tmp_path / "v.mp4", vfr=True, seconds=3.0)
    stamps = np.asarray(mf.frame_times(vfr=True, seconds=3.0))
    requested = [0.1, 0.5, 1.0, 1.7, 2.5, 2.9]
    expected = [int(np.argmin(np.abs(stamps - t))) for t in requested]
    frames = decode_frames(path, requested, probe(path))
    assert read_indices(frames) == expected
    # A uniform 24 fps reading would pick other frames: the check means something.
    assert expected != [round(t * 24) for t in requested]


def test_image(tmp_path: Path) -> None:
    path = mf.make_image(tmp_path / "i.png", 160, 96, index=5)
    frames = decode_frames(path, [0.0], probe(path))
    assert frames.shape == (1, 96, 160, 3)
    assert mf.frame_index_of(frames[0]) == 5
    np.testing.assert_array_equal(frames[0], mf.draw_frame(5, 160, 96))  # PNG: exact, and RGB not BGR


def test_no_times(long_clips: dict[str, Path]) -> None:
    info = probe(long_clips[".mp4"])
    assert decode_frames(long_clips[".mp4"], [], info).shape == (0, 64, 96, 3)


def test_file_damaged_after_probing_is_unusable(tmp_path: Path) -> None:
    path = mf.make_clip(tmp_path / "c.mkv", seconds=3.0, keyframe_interval=12)
    info = probe(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnusableMedia) as err:
        decode_frames(path, [2.5, 2.9], info)
    assert "\n" not in str(err.value)


def test_file_replaced_by_garbage_is_unusable(tmp_path: Path) -> None:
    path = mf.make_clip(tmp_path / "g.mp4", seconds=1.0)
    info = probe(path)
    mf.make_corrupt(path)
    with pytest.raises(UnusableMedia, match="truncated or corrupt"):
        decode_frames(path, [0.5], info)


@pytest.mark.parametrize(
    "src, dst",
    [
        ((64, 96), (32, 32)),  # wide -> square: crop the sides
        ((96, 64), (32, 32)),  # tall -> square: crop top and bottom
        ((64, 64), (48, 80)),  # square -> wide, enlarged
        ((64, 64), (80, 48)),  # square -> tall, enlarged
        ((90, 160), (96, 160)),  # nearly the same aspect
        ((64, 96), (64, 96)),  # already the size
    ],
)
def test_fit_to_bucket_sizes(src: tuple[int, int], dst: tuple[int, int]) -> None:
    frames = np.stack([mf.draw_frame(i, src[1], src[0]) for i in range(3)])
    out = fit_to_bucket(frames, *dst)
    assert out.shape == (3, dst[0], dst[1], 3) and out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


def test_fit_to_bucket_keeps_the_centre_and_the_aspect() -> None:
    # A wide frame with a centred 50 px square: scaled by 1/2 and cropped, it is a 25 px square in the middle.
    img = np.zeros((100, 200, 3), np.uint8)
    img[25:75, 75:125] = 255
    out = fit_to_bucket(img[None], 50, 50)[0]
    assert out.shape == (50, 50, 3)
    assert out[14:36, 14:36].min() > 200  # scaled by 1/2 both ways, not stretched
    assert out[:10, :].max() < 40 and out[:, :10].max() < 40 and out[40:, :].max() < 40 and out[:, 40:].max() < 40


def test_fit_to_bucket_takes_reversed_views() -> None:
    frames = np.stack([mf.draw_frame(i, 96, 64) for i in range(3)])
    out = fit_to_bucket(np.flip(frames, axis=0)[:, :, ::-1], 32, 32)
    assert out.shape == (3, 32, 32, 3)


def test_fit_to_bucket_single_frame_and_identity() -> None:
    img = mf.draw_frame(3, 96, 64)
    np.testing.assert_array_equal(fit_to_bucket(img, 64, 96), img)
    assert fit_to_bucket(img, 32, 48).shape == (32, 48, 3)
    assert mf.frame_index_of(fit_to_bucket(img, 128, 192)) == 3
