"""The dataset doctor on a folder that mixes good and broken files, in data, in text and on the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_main
from media_factory import (
    make_audio_only,
    make_clip,
    make_corrupt,
    make_image,
    make_truncated,
)

from core.config import defaults, load_preset
from core.data.doctor import (
    diagnose,
    diagnose_folder,
    exposure_rating,
    frames_kept,
    size_divisor,
)
from core.data.doctor_report import EXIT_OK, EXIT_STRICT, EXIT_UNUSABLE
from core.data.doctor_text import render_report
from core.data.frames import plan_frames
from core.data.media import MediaInfo

DEMO = ROOT / "resources" / "demo_dataset"


def _caption(media: Path, text: str | bytes) -> None:
    media.with_suffix(".txt").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


def _can_lock_folders(tmp: Path) -> bool:
    """Whether chmod 000 stops this process reading a folder (it does not stop root)."""
    probe_dir = tmp / "lock-probe"
    probe_dir.mkdir()
    probe_dir.chmod(0)
    try:
        os.listdir(probe_dir)
        return False
    except PermissionError:
        return True
    finally:
        probe_dir.chmod(0o755)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mixed")
    data = root / "data"
    good = [
        make_clip(data / "good_wide.mp4", width=96, height=64, seconds=1.0),
        make_clip(data / "good_tall.mp4", width=64, height=96, seconds=1.0),
        make_clip(data / "sub" / "good_deep.mkv", width=96, height=64, seconds=0.375, fps=16),  # 6 frames: a 5-frame bucket
        make_image(data / "still.png", 96, 64),
    ]
    for i, path in enumerate(good):
        _caption(path, f"good sample {i}")
    broken = {
        make_truncated(data / "truncated.mp4", seconds=2.0): "truncated: the file ends",
        make_corrupt(data / "corrupt.mp4"): "truncated or corrupt",
        make_audio_only(data / "audio.mp4"): "no video stream",
    }
    for path in broken:
        _caption(path, "a caption for a file that cannot train")
    nocap = make_clip(data / "nocap.mp4", seconds=0.5)
    broken[nocap] = "no caption: expected nocap.txt"
    for name, text, reason in (("empty", b"  \n", "empty caption"), ("latin", "caf\xe9 au lait".encode("latin-1"), "not UTF-8")):
        media = data / f"{name}.mp4"
        media.write_bytes(b"never probed: its caption is the problem")
        _caption(media, text)
        broken[media.with_suffix(".txt")] = reason
    (data / "loop").mkdir()
    (data / "loop" / "back").symlink_to(data, target_is_directory=True)
    broken[data / "loop" / "back"] = "symlink loop"
    locked = data / "locked"
    make_clip(locked / "hidden_away.mp4", seconds=0.5)
    _caption(locked / "hidden_away.mp4", "locked away")
    lockable = _can_lock_folders(root)
    locked.chmod(0)
    all_broken = root / "all_broken"
    make_corrupt(all_broken / "x.mp4")
    _caption(all_broken / "x.mp4", "x")
    (all_broken / "y.mov").write_bytes(b"")
    yield {"data": data, "good": good, "broken": broken, "locked": locked, "lockable": lockable, "all_broken": all_broken}
    locked.chmod(0o755)


def _config(**changes) -> dict:
    config = defaults()
    config.update(resolution=64, frames=9, max_steps=100)
    config["video_config"].update(max_frames=9, target_fps=16.0)
    config.update(changes)
    return config


def test_report_names_every_broken_file_with_its_reason(mixed: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = mixed["locked"]
    real_scandir = os.scandir

    def scandir(path):  # type: ignore[no-untyped-def]
        # As root, chmod 000 does not stop reading: refuse here so the report's handling is tested.
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = diagnose_folder(mixed["data"], _config())
    text = render_report(report)
    expected = dict(mixed["broken"])
    expected[locked] = "folder cannot be read (permission denied)"
    for path, reason in expected.items():
        matches = [i for i in report.issues if i.path == path and reason in i.reason]
        assert len(matches) == 1, (path, reason, report.issues)
        assert matches[0].fatal
        line = next((ln for ln in text.splitlines() if str(path) in ln), "")
        assert reason in line or matches[0].reason in line, (path, text)
    assert len(report.fatal_issues) == len(expected)

    assert (report.clips, report.images, report.train_items, report.validation_items) == (3, 1, 4, 0)
    assert report.unusable_files == 3
    assert report.captions == {"missing": 1, "empty": 1, "not_utf8": 1, "unreadable": 0}
    assert report.media_found == 4 + 3 + 3
    assert report.usable and report.exit_code == EXIT_OK
    assert {f.path for f in report.files} == set(mixed["good"])
    assert report.durations and report.durations.minimum == pytest.approx(0.375, abs=0.01)
    assert report.durations.maximum == pytest.approx(1.0, abs=0.01)
    assert report.sizes and report.sizes.minimum in ((96, 64), (64, 96))
    # Buckets at resolution 64, multiples of 16: landscape, portrait and the still; frames per docs.
    plan = {(str(b.bucket), b.kind): b.items for b in report.buckets}
    assert plan == {("9x48x80", "video"): 1, ("9x80x48", "video"): 1, ("5x48x80", "video"): 1, ("1x48x80", "image"): 1}
    assert "Result: ready - 4 items can train; 8 problems skipped" in text
    json.dumps(report.to_dict())  # JSON-ready as it is

    strict = diagnose_folder(mixed["data"], _config(strict_data=True))
    assert strict.usable and strict.strict_refused and strict.exit_code == EXIT_STRICT
    assert "strict_data refused it" in render_report(strict)


def test_nothing_usable_says_why(mixed: dict) -> None:
    report = diagnose_folder(mixed["all_broken"], _config())
    assert not report.usable and report.exit_code == EXIT_UNUSABLE
    assert report.why_unusable == "every captioned media file is unusable"
    assert {i.path.name for i in report.fatal_issues} == {"x.mp4", "y.mov"}
    assert "nothing to train on" in render_report(report)
    empty = diagnose({**_config(), "datasets": []})
    assert not empty.usable and empty.why_unusable == "no dataset folders are configured"


def test_holdout_and_overfitting_estimate_on_the_demo_dataset() -> None:
    report = diagnose(load_preset("#demo tiny wan LoRA"))
    assert (report.clips, report.images, report.media_found, report.issues) == (6, 2, 8, [])
    assert report.batches_per_pass == 8 and report.total_batches == 200
    (dataset,) = report.datasets
    assert dataset.times_seen == 25 and dataset.rating == "moderate" and dataset.hint == ""
    assert {str(b.bucket) for b in report.buckets} == {"9x48x80", "9x80x48", "9x64x64", "1x48x80", "1x64x64"}

    risky = diagnose_folder(DEMO, _config(max_steps=2000, gradient_accumulation_steps=1))
    assert risky.datasets[0].rating == "risky" and "max_steps" in risky.datasets[0].hint
    epochs = diagnose_folder(DEMO, _config(stop_after="EPOCHS", epochs=3))
    assert epochs.datasets[0].times_seen == 3 and epochs.datasets[0].rating == "conservative"

    config = _config()
    config["validation"]["holdout_fraction"] = 0.25
    calls: list[tuple[int, int]] = []
    held = diagnose_folder(DEMO, config, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 8) and calls[-1] == (8, 8)
    assert (held.train_items, held.validation_items) == (6, 2)
    assert sorted(f.split for f in held.files).count("validation") == 2


def test_exposure_ratings_and_size_divisor() -> None:
    assert [exposure_rating(t) for t in (0, 9.9, 10, 50, 50.5, 99, 100, 1000)] == [
        "conservative", "conservative", "moderate", "moderate", "high", "high", "risky", "risky",
    ]
    config = defaults()
    assert size_divisor(config) == 16
    config["video_config"]["spatial_compression_ratio"] = 16
    assert size_divisor(config) == 32


@pytest.mark.parametrize("duration", [0.05, 0.3, 0.55, 1.01, 2.5, 3.0, 11.0])
@pytest.mark.parametrize("fps,frames,max_frames", [(16.0, 9, 9), (24.0, 16, 16), (24.0, 33, 49)])
def test_frames_kept_matches_frame_selection(duration: float, fps: float, frames: int, max_frames: int) -> None:
    config = defaults()
    config["frames"] = frames
    config["video_config"].update(target_fps=fps, max_frames=max_frames)
    info = MediaInfo(Path("c.mp4"), "video", 96, 64, 0, 30.0, duration, int(duration * 30), "h264", False, 1, 1)
    plan = plan_frames(info, frames=frames, video_config=config["video_config"])
    assert frames_kept(info, config) == len(plan.times)


def test_cli_exit_codes(mixed: dict, tmp_path: Path) -> None:
    ok = run_main("doctor", str(mixed["data"]), "--set", "resolution=64")
    assert ok.returncode == 0, ok.stderr
    for path, reason in mixed["broken"].items():
        assert any(str(path) in ln and reason.split(":")[0] in ln for ln in ok.stdout.splitlines()), (path, ok.stdout)
    if mixed["lockable"]:
        assert f"{mixed['locked']}" in ok.stdout and "permission denied" in ok.stdout
    # else: running as root, chmod 000 does not lock the folder; the in-process test covers the report.

    strict = run_main("doctor", str(mixed["data"]), "--set", "strict_data=true")
    assert strict.returncode == EXIT_STRICT and "strict_data refused it" in strict.stdout

    broken = run_main("doctor", str(mixed["all_broken"]))
    assert broken.returncode == EXIT_UNUSABLE and "nothing to train on" in broken.stdout

    bad = run_main("doctor", "--preset", "no such preset", str(mixed["data"]))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1

    nothing = run_main("doctor")
    assert nothing.returncode == 2 and "give a FOLDER" in nothing.stderr

    as_json = run_main("doctor", "--preset", "#demo tiny wan LoRA", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["exit_code"] == 0 and data["clips"] == 6 and data["images"] == 2


def test_doctor_command_does_not_import_torch() -> None:
    code = "import sys, main; main.main(['doctor', 'resources/demo_dataset']); print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().endswith("NO-TORCH"), result.stdout + result.stderr
    assert "Result: ready - 8 items can train." in result.stdout


def test_the_doctor_plans_with_the_models_own_frame_counts_and_size(tiny_model, tmp_path) -> None:
    """With the model folder at hand the doctor counts frames and sizes as training will (core.models.shape)."""
    from media_factory import make_clip

    from core.config import resolve
    from core.data.doctor import diagnose
    from core.data.doctor_text import render_report
    from core.models.shape import model_shape

    data = tmp_path / "clips"
    data.mkdir()
    make_clip(data / "long.mp4", width=96, height=64, fps=16, seconds=1.0)  # 16 frames to pick from
    (data / "long.txt").write_text("a clip", encoding="utf-8")
    base = {"datasets": [{"path": str(data)}], "resolution": 64, "frames": 16, "video_config": {"max_frames": 16}}
    # Estimated (no model at hand): 4k + 1 -> 13 frames.
    estimated = diagnose(resolve({**base, "base_model": str(tmp_path / "nowhere")}))
    assert [f.frames_kept for f in estimated.files] == [13]
    assert "the model folder is not at hand" in render_report(estimated)
    # CogVideoX takes 8k + 1 -> 9 frames; its 5b-I2V layout one size, 64x64 for the tiny one.
    for family, bucket in (("cogvideox", None), ("cogvideox_i2v", (64, 64))):
        config = resolve({**base, "base_model": str(tiny_model(family))})
        shape = model_shape(config)
        assert shape is not None and shape.frame_rule.accepts(9) and not shape.frame_rule.accepts(13)
        report = diagnose(config, shape=shape)
        (plan,) = report.files
        assert plan.frames_kept == 9
        if bucket:
            assert (plan.bucket.height, plan.bucket.width) == bucket
        assert "(8k + 1) frames, as CogVideoX" in render_report(report)


def test_the_doctor_leaves_out_what_the_model_does_not_take(tiny_model, tmp_path) -> None:
    """An image model (HiDream): clips are listed as left out, as training leaves them out; images plan."""
    from media_factory import make_clip, make_image

    from core.config import resolve
    from core.data.doctor import diagnose
    from core.models.shape import model_shape

    data = tmp_path / "mixed"
    data.mkdir()
    make_clip(data / "clip.mp4", width=64, height=64, fps=16, seconds=0.5)
    make_image(data / "still.png", width=64, height=64)
    for stem in ("clip", "still"):
        (data / f"{stem}.txt").write_text(f"a {stem}", encoding="utf-8")
    config = resolve({"datasets": [{"path": str(data)}], "resolution": 64, "base_model": str(tiny_model("hidream"))})
    report = diagnose(config, shape=model_shape(config))
    assert [f.path.name for f in report.files] == ["still.png"]
    assert any(i.path.name == "clip.mp4" and "image model" in i.reason for i in report.issues)
    assert report.usable and report.train_items == 1


def test_a_file_its_bucket_scales_up_much_is_warned_of_and_an_image_folder_counts_images(tmp_path: Path) -> None:
    # At resolution 256 a 96 x 64 image fills a bucket of about 256² pixels: scaled up about 3.5x.
    make_image(tmp_path / "small.png", width=96, height=64)
    make_image(tmp_path / "large.png", width=320, height=320, index=1)
    for name in ("small", "large"):
        _caption(tmp_path / f"{name}.png", f"a {name} picture")
    report = diagnose_folder(tmp_path, _config(resolution=256))
    [warning] = [i for i in report.issues if not i.fatal]
    assert warning.path == tmp_path / "small.png" and not [i for i in report.issues if i.fatal]
    small = next(f for f in report.files if f.path.name == "small.png")
    scale = max(small.bucket.height / 64, small.bucket.width / 96)
    assert warning.reason.startswith(f"scaled up {scale:.1f}x from 96x64 to fill its {small.bucket.width}x{small.bucket.height} bucket")
    assert "use a larger image, or a lower resolution" in warning.reason
    text = render_report(report)
    assert "Warnings (1)" in text and "2 images train" in text and "Result: ready - 2 images can train." in text
    assert " 1 image  " in text and "item" not in text.split("Buckets")[1].split("Files")[0]
    # At the image's own size nothing is scaled up.
    assert not [i for i in diagnose_folder(tmp_path, _config(resolution=64)).issues if not i.fatal]
