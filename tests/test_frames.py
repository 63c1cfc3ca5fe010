"""Frame selection (core/data/frames.py) against the rules in docs/data-pipeline.md "Frame selection"."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.data.frames import FramePlan, plan_frames, sample_length, select_frame_times
from core.data.media import MediaInfo


def clip(duration: float, fps: float = 24.0, kind: str = "video") -> MediaInfo:
    frames = max(1, round(duration * fps))
    return MediaInfo(Path("clip.mp4"), kind, 96, 64, 0, fps, duration, frames, "h264", False, 1000, 1)


IMAGE = MediaInfo(Path("still.png"), "image", 96, 64, 0, 1.0, 0.0, 1, "png", False, 100, 1)


def vc(**kw: object) -> dict:
    base = {
        "max_frames": 16,
        "frame_sample_strategy": "uniform",
        "target_fps": 24.0,
        "max_duration": 10.0,
        "temporal_compression_ratio": 4,
        "temporal_augmentation": False,
    }
    base.update(kw)
    return base


def indices(times: list[float] | tuple[float, ...], fps: float = 24.0) -> list[int]:
    out = [t * fps for t in times]
    assert all(abs(x - round(x)) < 1e-6 for x in out), "every time is a candidate k / target_fps"
    return [round(x) for x in out]


# ---------------------------------------------------------------- rule 4

@pytest.mark.parametrize(
    "frames, window, ratio, expected",
    [
        (16, 100, 4, 13),  # rounded down to k * 4 + 1
        (17, 100, 4, 17),
        (33, 20, 4, 17),  # the window is shorter: the largest k * 4 + 1 that fits
        (33, 5, 4, 5),
        (33, 4, 4, 1),  # fewer than ratio + 1 candidates: one frame
        (3, 100, 4, 1),
        (16, 100, 1, 16),  # image models: any count
        (16, 9, 1, 9),
        (49, 49, 8, 49),
        (49, 48, 8, 41),
        (1, 1, 4, 1),
    ],
)
def test_sample_length(frames: int, window: int, ratio: int, expected: int) -> None:
    assert sample_length(frames, window, ratio) == expected


# ---------------------------------------------------------------- rules 1-3, 5: uniform

def test_uniform_consecutive_from_the_start_when_window_equals_f() -> None:
    times = select_frame_times(clip(5.0), frames=17, video_config=vc(max_frames=17), variant=0, seed=1, content_key="a")
    assert indices(times) == list(range(17))


def test_uniform_spreads_over_the_window() -> None:
    times = select_frame_times(clip(5.0), frames=17, video_config=vc(max_frames=33), variant=0, seed=1, content_key="a")
    assert indices(times) == [int(i) for i in np.round(np.linspace(0, 32, 17))]
    assert indices(times)[0] == 0 and indices(times)[-1] == 32


def test_resampling_to_target_fps() -> None:
    # A 30 fps clip resampled to 12 fps: candidates every 1/12 s.
    cfg = vc(target_fps=12.0, max_frames=9)
    times = select_frame_times(clip(2.0, fps=30.0), frames=9, video_config=cfg, variant=0, seed=0, content_key="a")
    assert times == pytest.approx([k / 12.0 for k in range(9)])


def test_max_duration_limits_the_span() -> None:
    times = select_frame_times(clip(60.0), frames=5, video_config=vc(max_frames=1000, max_duration=2.0), variant=0, seed=0, content_key="a")
    # N = 48 candidates in [0, 2): the window is all of them, the last at 47 / 24.
    assert indices(times) == [0, 12, 24, 35, 47]  # numpy rounds 23.5 and 35.25 as round(linspace) says
    assert max(times) < 2.0


def test_short_clip_goes_to_a_shorter_bucket() -> None:
    # 0.5 s at 24 fps: 12 candidates, so F = 9 of the requested 17.
    times = select_frame_times(clip(0.5), frames=17, video_config=vc(max_frames=64), variant=0, seed=0, content_key="a")
    assert len(times) == 9


def test_very_short_clip_gives_one_frame() -> None:
    times = select_frame_times(clip(3 / 24), frames=17, video_config=vc(), variant=0, seed=0, content_key="a")
    assert times == [0.0]


def test_image_is_one_frame() -> None:
    assert select_frame_times(IMAGE, frames=17, video_config=vc(), variant=3, seed=0, content_key="a") == [0.0]
    assert plan_frames(IMAGE, frames=17, video_config=vc(temporal_augmentation=True), variant=3) == FramePlan((0.0,), False)


def test_missing_settings_take_the_schema_defaults() -> None:
    # Defaults: max_frames 16, target_fps 24, ratio 4 -> 13 frames spread over 16 candidates.
    times = select_frame_times(clip(5.0), frames=16, video_config={}, variant=0, seed=0, content_key="a")
    assert indices(times) == [int(i) for i in np.round(np.linspace(0, 15, 13))]


# ---------------------------------------------------------------- random

def test_random_is_reproducible_per_variant_and_varies_across_variants() -> None:
    cfg = vc(frame_sample_strategy="random", max_frames=17)
    info = clip(10.0)
    first = [select_frame_times(info, frames=17, video_config=cfg, variant=v, seed=5, content_key="abc") for v in range(8)]
    again = [select_frame_times(info, frames=17, video_config=cfg, variant=v, seed=5, content_key="abc") for v in range(8)]
    assert first == again
    assert len({t[0] for t in first}) > 1
    for times in first:
        idx = indices(times)
        assert idx == list(range(idx[0], idx[0] + 17))
        assert 0 <= idx[0] <= 240 - 17


def test_random_depends_on_seed_and_content() -> None:
    cfg = vc(frame_sample_strategy="random", max_frames=17)
    info = clip(30.0)
    starts = {
        (seed, key): select_frame_times(info, frames=17, video_config=cfg, variant=0, seed=seed, content_key=key)[0]
        for seed in range(4)
        for key in ("a", "b", "c")
    }
    assert len(set(starts.values())) > 3


def test_random_start_is_stable_across_processes() -> None:
    # Seeded by a hash of the inputs, not Python's per-process hash(): a fixed value.
    cfg = vc(frame_sample_strategy="random", max_frames=17)
    a = select_frame_times(clip(30.0), frames=17, video_config=cfg, variant=2, seed=42, content_key="deadbeef")
    code = (
        "from pathlib import Path; from core.data.media import MediaInfo; from core.data.frames import select_frame_times\n"
        "info = MediaInfo(Path('clip.mp4'), 'video', 96, 64, 0, 24.0, 30.0, 720, 'h264', False, 1000, 1)\n"
        f"print(select_frame_times(info, frames=17, video_config={cfg!r}, variant=2, seed=42, content_key='deadbeef')[0])\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == a[0]


# ---------------------------------------------------------------- keyframe

def test_keyframe_variants_cycle_through_starts_where_a_window_fits() -> None:
    cfg = vc(frame_sample_strategy="keyframe", max_frames=17)
    info = clip(4.0)  # 96 candidates; a 17-candidate window fits at starts <= 79
    starts = [0.0, 1.0, 2.5, 3.5]  # 3.5 s = candidate 84: no full window
    got = [
        indices(select_frame_times(info, frames=17, video_config=cfg, variant=v, seed=0, content_key="a", starts=starts))[0]
        for v in range(5)
    ]
    assert got == [0, 24, 60, 0, 24]


def test_keyframe_start_rounds_up_to_the_next_candidate() -> None:
    cfg = vc(frame_sample_strategy="keyframe", max_frames=17)
    times = select_frame_times(clip(4.0, fps=30.0), frames=17, video_config=cfg, variant=0, seed=0, content_key="a", starts=[31 / 30])
    assert times[0] >= 31 / 30  # the first frame is on the new side of a cut
    assert indices(times)[0] == math.ceil(31 / 30 * 24)


def test_keyframe_without_fitting_starts_uses_the_beginning() -> None:
    cfg = vc(frame_sample_strategy="keyframe", max_frames=17)
    for starts in (None, [], [3.9]):
        times = select_frame_times(clip(4.0), frames=17, video_config=cfg, variant=1, seed=0, content_key="a", starts=starts)
        assert indices(times)[0] == 0


# ---------------------------------------------------------------- augmentation

def test_plan_without_augmentation_is_the_plain_selection() -> None:
    for strategy in ("uniform", "random", "keyframe"):
        cfg = vc(frame_sample_strategy=strategy, max_frames=33)
        for v in range(4):
            plan = plan_frames(clip(6.0), frames=17, video_config=cfg, variant=v, seed=3, content_key="k", starts=[1.0, 2.0])
            plain = select_frame_times(clip(6.0), frames=17, video_config=cfg, variant=v, seed=3, content_key="k", starts=[1.0, 2.0])
            assert plan == FramePlan(tuple(plain), False)


def test_augmented_variants_crop_and_sometimes_reverse() -> None:
    cfg = vc(temporal_augmentation=True, max_frames=17)
    info = clip(10.0)
    plans = [plan_frames(info, frames=17, video_config=cfg, variant=v, seed=9, content_key="k") for v in range(40)]
    assert plans[0] == FramePlan(tuple(select_frame_times(info, frames=17, video_config=cfg, variant=0, seed=9, content_key="k")), False)
    flips = [p.reversed for p in plans[1:]]
    assert 5 < sum(flips) < 34  # about half
    strides = set()
    for p in plans[1:]:
        idx = indices(p.times)
        assert len(idx) == 17
        steps = set(np.diff(idx).tolist())
        assert len(steps) == 1
        strides |= steps
        assert 0 <= idx[0] and idx[-1] < 240
    assert strides == {1, 2}
    assert len({p.times[0] for p in plans[1:]}) > 10
    again = [plan_frames(info, frames=17, video_config=cfg, variant=v, seed=9, content_key="k") for v in range(40)]
    assert plans == again


def test_augmented_crop_uses_stride_one_when_two_does_not_fit() -> None:
    cfg = vc(temporal_augmentation=True, max_frames=64)
    info = clip(1.0)  # 24 candidates: 17 frames at stride 2 would need 33
    for v in range(1, 12):
        idx = indices(plan_frames(info, frames=17, video_config=cfg, variant=v, seed=0, content_key="k").times)
        assert np.diff(idx).tolist() == [1] * 16


# ---------------------------------------------------------------- properties

@settings(max_examples=150, deadline=None)
@given(
    duration=st.floats(min_value=0.02, max_value=40.0),
    fps=st.sampled_from([8.0, 12.0, 16.0, 23.976, 24.0, 30.0]),
    frames=st.integers(min_value=1, max_value=129),
    max_frames=st.integers(min_value=1, max_value=200),
    ratio=st.sampled_from([1, 2, 4, 8]),
    strategy=st.sampled_from(["uniform", "random", "keyframe"]),
    augment=st.booleans(),
    variant=st.integers(min_value=0, max_value=9),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    max_duration=st.floats(min_value=0.1, max_value=20.0),
    starts=st.lists(st.floats(min_value=0.0, max_value=40.0), max_size=6),
)
def test_selection_properties(duration, fps, frames, max_frames, ratio, strategy, augment, variant, seed, max_duration, starts) -> None:
    cfg = vc(max_frames=max_frames, temporal_compression_ratio=ratio, frame_sample_strategy=strategy,
             temporal_augmentation=augment, target_fps=fps, max_duration=max_duration)
    info = clip(duration)
    span = min(duration, max_duration)
    n = max(1, math.ceil(span * fps - 1e-6))
    w = min(n, max_frames)
    plan = plan_frames(info, frames=frames, video_config=cfg, variant=variant, seed=seed, content_key="c", starts=starts)
    times = list(plan.times)
    f = len(times)
    assert f == sample_length(frames, w, ratio)
    assert (f - 1) % ratio == 0 and f <= frames and f <= w
    assert times == sorted(times) and len(set(times)) == f
    assert all(0.0 <= t < max(span, 1e-9) or t == 0.0 for t in times)  # inside the span
    idx = indices(times, fps)
    assert all(0 <= i < n for i in idx)
    if not augment or variant == 0:
        assert not plan.reversed
        plain = select_frame_times(info, frames=frames, video_config=cfg, variant=variant, seed=seed, content_key="c", starts=starts)
        assert times == plain
        assert idx[-1] - idx[0] <= w - 1  # the F frames lie in one window of W candidates
        if strategy == "uniform":
            assert idx[0] == 0
    again = plan_frames(info, frames=frames, video_config=cfg, variant=variant, seed=seed, content_key="c", starts=starts)
    assert again == plan
