"""Hostile inputs (issue 13, points 6 and 9): broken preset files, names no file system can hold,
damaged mp4 files, sample sizes the model cannot make, and an embedding whose placeholder no caption
holds. Each gets one line naming the file or key and what to do; nothing that existed is changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before pytest-qt's session QApplication exists: no display here, and none needed.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import media_factory as mf  # noqa: E402
from conftest import run_main  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtWidgets import QInputDialog, QMessageBox  # noqa: E402

from core.config import list_presets, load_preset, parse_set_arguments, resolve  # noqa: E402
from core.config.presets import MAX_NAME_BYTES, check_user_preset_name, save_user_preset  # noqa: E402
from core.config.settings import defaults  # noqa: E402
from core.data.decode import decode_frames  # noqa: E402
from core.data.media import UnusableMedia  # noqa: E402
from core.data.probe import probe  # noqa: E402
from core.errors import ConfigError  # noqa: E402
from core.paths import user_preset_dir  # noqa: E402
from core.train.support import size_refusals  # noqa: E402
from core.train.trainer import Trainer  # noqa: E402
from gui.main_window import MainWindow  # noqa: E402
from gui.window_state import window_settings  # noqa: E402

GOOD = '{"__version": 1, "__description": "a good one", "lora": {"rank": 8}}'

# name: (file content, or None for a folder; words its reason must hold)
BROKEN = {
    "deep": ("[" * 100_000, "nests lists or objects too deeply"),
    "deep object": ('{"lora": ' * 100_000, "nests lists or objects too deeply"),
    "long number": ('{"learning_rate": ' + "7" * 5000 + "}", "a number too long to read"),
    "long integer": ('{"lora": {"rank": ' + "9" * 4000 + "}}", "'lora.rank' must be an integer from 1 to 1024"),
    "latin-1": (b'{"__description": "caf\xe9"}', "is not UTF-8 text"),
    "lone surrogate": ('{"__description": "\\ud800"}', "not valid Unicode"),
    "a list": ("[1, 2]", "must hold a JSON object of settings ({...}), not a list"),
    "a number": ("42", "must hold a JSON object of settings ({...}), not a number"),
    "folder": (None, "is a folder, not a JSON config file"),
}


def _write_broken(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """The broken presets and one good one in folder; returns what each was (content, mtime)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "good.json").write_text(GOOD, encoding="utf-8")
    for name, (content, _) in BROKEN.items():
        path = folder / f"{name}.json"
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return _snapshot(folder)


def _snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    return {p.name: (None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# -- broken preset files ---------------------------------------------------------------------------


def test_broken_presets_are_listed_with_their_reason_beside_the_good_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = user_preset_dir()
    _write_broken(folder)
    (folder / "locked.json").write_text(GOOD, encoding="utf-8")
    before = _snapshot(folder)
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:  # root reads any file, so an unreadable one is simulated
        if self.name == "locked.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    infos = {p.name: p for p in list_presets() if not p.bundled}
    assert set(infos) == {"good", "locked", *BROKEN}
    assert infos["good"].error is None and infos["good"].description == "a good one"
    assert any(p.bundled and p.error is None for p in list_presets())  # the bundled ones still load
    for name, (_, words) in BROKEN.items():
        error = infos[name].error
        assert error is not None and words in error, (name, error)
        assert str(folder / f"{name}.json") in error and "\n" not in error and len(error) < 300, (name, error)
    assert "cannot be read (Permission denied)" in (infos["locked"].error or "")
    monkeypatch.undo()
    assert _snapshot(folder) == before  # listing read them, and changed none


def test_presets_list_command_survives_broken_presets() -> None:
    folder = user_preset_dir()
    _write_broken(folder)
    (folder / "multi.json").write_text('{"__description": "one\\ntwo\\u0000three"}', encoding="utf-8")
    before = _snapshot(folder)
    result = run_main("presets", "list")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert "  good  - a good one" in lines and "  multi  - one two three" in lines  # one printable line each
    assert any(line.startswith("  #wan 2.2 LoRA  [") for line in lines)
    for name, (_, words) in BROKEN.items():
        mine = [line for line in lines if line.startswith(f"  {name}  [cannot be loaded: ")]
        assert len(mine) == 1 and words in mine[0] and f"{name}.json" in mine[0], (name, lines)
    assert _snapshot(folder) == before


def test_a_config_file_too_deep_to_parse_is_one_line_for_every_command(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000, encoding="utf-8")
    result = run_main("presets", "show", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: nests lists or objects too deeply to be settings; fix the file or choose another"
    with pytest.raises(ConfigError, match="lora.rank"):
        parse_set_arguments(["lora.rank=" + "[" * 100_000])


def test_the_window_builds_with_broken_presets_and_says_why(qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = user_preset_dir()
    _write_broken(folder)
    window_settings().setValue("last_preset", "deep")  # the preset loaded last broke since
    warnings: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: warnings.append(a[2]) or QMessageBox.StandardButton.Ok)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Discard)
    window = MainWindow()
    qtbot.addWidget(window)
    window.show()
    window.restore_last_settings()
    assert "The last preset, 'deep', could not be loaded" in window.statusBar().currentMessage()
    assert "nests lists or objects too deeply" in window.statusBar().currentMessage()
    assert window.loaded is None and window.config == defaults()

    bar = window.preset_bar
    for name, (_, words) in BROKEN.items():
        assert name in bar.names() and not bar.is_enabled(name), name
        tip = bar.combo.itemData(bar.combo.findData(name), Qt.ItemDataRole.ToolTipRole)
        assert tip.startswith("Cannot be loaded: ") and words in tip, (name, tip)
    assert bar.is_enabled("good") and bar.is_enabled("#wan 2.2 LoRA")

    # Chosen while it was good, broken before Load: the reason in a message, no exception.
    bar.select("good")
    (folder / "good.json").write_text('{"learning_rate": ' + "7" * 5000 + "}", encoding="utf-8")
    bar.load_button.click()
    assert len(warnings) == 1 and "good.json: holds a number too long to read" in warnings[0]
    assert window.loaded is None and not bar.is_enabled("good")  # the list was read again
    bar.select("#wan 2.2 LoRA")
    bar.load_button.click()
    assert window.loaded is not None and window.loaded.name == "#wan 2.2 LoRA"


# -- preset names ----------------------------------------------------------------------------------


BAD_NAMES = {
    "too long": ("x" * 300, f"at most {MAX_NAME_BYTES} bytes in UTF-8 (this one is 300)"),
    "too long once encoded": ("\u00e9" * 100, f"at most {MAX_NAME_BYTES} bytes in UTF-8 (this one is 200)"),
    "reserved": ("CON", "device name on Windows"),
    "reserved, lower case": ("nul", "device name on Windows"),
    "reserved with extension": ("com1.backup", "device name on Windows"),
    "reserved, space before the dot": ("LPT9 .old", "device name on Windows"),
    "less than": ("a<b", "cannot contain <"),
    "colon": ("run: 2", "cannot contain :"),
    "quote": ('say "hi"', 'cannot contain "'),
    "slash": ("a/b", "cannot contain /"),
    "backslash": ("a\\b", "cannot contain \\"),
    "pipe": ("a|b", "cannot contain |"),
    "question mark": ("why?", "cannot contain ?"),
    "star": ("best*", "cannot contain *"),
    "tab": ("a\tb", "control characters"),
    "line break": ("a\nb", "control characters"),
    "trailing dot": ("version 2.", "cannot end with a dot"),
    "only dots": ("..", "cannot end with a dot"),
    "empty": ("", "needs a name"),
    "only spaces": ("   ", "needs a name"),
    "ends in .json": ("mine.json", "leave the .json out"),
    "bundled prefix": ("#mine", "kept for bundled presets"),
    "undecodable bytes": ("bad\udcffname", "not UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_names_no_file_system_can_hold_are_refused_in_one_line(case: str) -> None:
    name, words = BAD_NAMES[case]
    with pytest.raises(ConfigError) as info:
        save_user_preset(name, defaults())
    message = str(info.value)
    assert words in message and "\n" not in message and len(message) < 250, message
    assert info.value.key == "preset"
    assert not user_preset_dir().exists() or list(user_preset_dir().iterdir()) == []


@pytest.mark.parametrize("name", ["my run", "Wan 2.2 – ünïcode €", "x" * MAX_NAME_BYTES, "con game", "COM10", "a.b"])
def test_ordinary_names_are_kept(name: str) -> None:
    assert check_user_preset_name(f" {name} ") == name
    path = save_user_preset(name, defaults())
    assert path.name == f"{name}.json" and [p.name for p in list_presets() if not p.bundled] == [name]


def test_a_name_differing_only_in_case_is_refused() -> None:
    save_user_preset("Mine", defaults())
    before = _snapshot(user_preset_dir())
    with pytest.raises(ConfigError, match="a preset named 'Mine' exists; names that differ only in case"):
        save_user_preset("mine", defaults(), overwrite=True)
    assert _snapshot(user_preset_dir()) == before


def test_presets_save_refuses_a_long_name_in_one_line() -> None:
    folder = user_preset_dir()
    folder.mkdir(parents=True)
    (folder / "kept.json").write_text(GOOD, encoding="utf-8")
    before = _snapshot(folder)
    result = run_main("presets", "save", "y" * 1000)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: a preset name can be at most {MAX_NAME_BYTES} bytes in UTF-8 (this one is 1000); choose a shorter name"
    ]
    assert _snapshot(folder) == before
    for name in ("AUX", "what?"):
        result = run_main("presets", "save", name)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and name in result.stderr
    assert _snapshot(folder) == before
    assert run_main("presets", "delete", "z" * 1000).returncode == 2  # no such preset, in one line
    assert _snapshot(folder) == before


def test_the_window_refuses_a_long_name_and_keeps_asking(qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([("q" * 400, True), ("PRN", True), ("fine", True)])
    warnings: list[str] = []
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: next(answers))
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: warnings.append(a[2]) or QMessageBox.StandardButton.Ok)
    window = MainWindow()
    qtbot.addWidget(window)
    window.load("#wan 2.2 LoRA 8GB")
    assert window.save_as() is True
    assert len(warnings) == 2 and "at most" in warnings[0] and "device name on Windows" in warnings[1]
    assert [p.name for p in list_presets() if not p.bundled] == ["fine"]
    with pytest.raises(ConfigError, match="at most"):
        window.save_to("w" * 400)


# -- damaged mp4 files -----------------------------------------------------------------------------

CUT_SHORT = "(a copy or download cut short); re-export or re-download it"
NO_INDEX = "damaged: its index (the MP4 'moov' box) is missing, as when a recording or export stops early; re-export or re-download it"


def _without_index(path: Path) -> Path:
    """A clip whose writer stopped before the index: its boxes up to 'moov', which is at the end."""
    mf.make_clip(path, seconds=2.0)  # no faststart: the index comes last
    data = path.read_bytes()
    at = data.rindex(b"moov") - 4
    path.write_bytes(data[:at])
    return path


def test_a_clip_cut_in_half_is_reported_as_truncated(tmp_path: Path) -> None:
    for faststart in (False, True):  # the index after the frames (most cameras), or before them
        path = mf.make_truncated(tmp_path / f"cut-{faststart}.mp4", faststart=faststart, keep=0.5, width=320, height=240)
        with pytest.raises(UnusableMedia) as info:
            probe(path)
        reason = str(info.value)
        assert reason.startswith("truncated: the file ends ") and "'mdat' box" in reason and reason.endswith(CUT_SHORT)
        assert "codec" not in reason


def test_a_cut_inside_the_index_is_truncated_not_an_unsupported_codec(tmp_path: Path) -> None:
    # Cut inside 'moov', FFmpeg reports anything from "Invalid data" to "no video stream" and an
    # unknown codec, depending on where the cut fell.
    whole = mf.make_clip(tmp_path / "whole.mp4", seconds=3.0, faststart=True, width=320, height=240)
    data = whole.read_bytes()
    start = data.index(b"moov") - 4
    end = start + int.from_bytes(data[start:start + 4], "big")
    cut = tmp_path / "cut.mp4"
    reasons = set()
    for keep in range(start + 8, end, 24):
        cut.write_bytes(data[:keep])
        with pytest.raises(UnusableMedia) as info:
            probe(cut)
        reasons.add(str(info.value).split(" bytes into ")[-1])
    assert reasons == {f"its {end - start:,}-byte 'moov' box {CUT_SHORT}"}


def test_a_clip_without_its_index_is_reported_as_damaged(tmp_path: Path) -> None:
    with pytest.raises(UnusableMedia) as info:
        probe(_without_index(tmp_path / "no-index.mp4"))
    assert str(info.value) == NO_INDEX


def test_a_clip_damaged_after_probing_says_so_when_decoded(tmp_path: Path) -> None:
    path = mf.make_clip(tmp_path / "c.mp4", seconds=2.0)
    info = probe(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UnusableMedia, match="^truncated: the file ends .* re-export or re-download it$"):
        decode_frames(path, [0.1, 1.5], info)


def test_the_doctor_names_the_truncated_and_the_damaged_clip(tmp_path: Path) -> None:
    folder = tmp_path / "clips"
    good = mf.make_clip(folder / "good.mp4", seconds=1.0)
    cut = mf.make_truncated(folder / "cut.mp4", keep=0.5)
    lost = _without_index(folder / "lost.mp4")
    for clip in (good, cut, lost):
        clip.with_suffix(".txt").write_text("a clip", encoding="utf-8")
    before = _snapshot(folder)
    result = run_main("doctor", str(folder), "--set", "resolution=64")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    cut_lines = [line for line in lines if str(cut) in line]
    assert len(cut_lines) == 1 and "truncated: the file ends " in cut_lines[0] and cut_lines[0].endswith(CUT_SHORT)
    assert [line for line in lines if str(lost) in line][0].endswith(NO_INDEX)
    assert "unsupported codec" not in result.stdout
    assert _snapshot(folder) == before


# -- settings the model cannot honour --------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of two clips each: captions without the placeholder, and one with it beside one without."""
    root = tmp_path_factory.mktemp("faults-clips")
    out = {}
    for name, captions in (("plain", ["a red square moving", "a square at rest"]),
                           ("mixed", ["a photo of <concept> moving right", "a square at rest"])):
        folder = root / name
        for i, caption in enumerate(captions):
            mf.make_clip(folder / f"clip{i}.mp4", width=64, height=64, fps=16, seconds=1.0)
            (folder / f"clip{i}.txt").write_text(caption, encoding="utf-8")
        out[name] = folder
    return out


def _run_config(data: Path, root: Path, **overrides: object) -> dict:
    """The bundled tiny Wan 2.1 demo preset on `data`, writing only under `root`."""
    overlay = {
        "datasets": [{"path": str(data), "repeats": 1}],
        "workspace_dir": str(root / "workspace"),
        "cache_dir": str(root / "cache"),
        "output_path": str(root / "out" / "result.safetensors"),
        "dataloader_threads": 0,
        "max_steps": 4,
        "warmup_steps": 0,
        "backup": {"every_n_steps": 0},
        **overrides,
    }
    return resolve(dict(load_preset("#demo tiny wan LoRA")), overlay)


@pytest.mark.parametrize(
    "changes, key, message",
    [
        ({"sampling": {"width": 70}}, "sampling.width",
         "sampling.width 70 is not a multiple of 16, which this model's frame sizes must be (samples would be 64 pixels wide); use 64 or 80"),
        ({"sampling": {"height": 40}}, "sampling.height",
         "sampling.height 40 is not a multiple of 16, which this model's frame sizes must be (samples would be 32 pixels high); use 32 or 48"),
        ({"resolution": 70}, "resolution", "resolution 70 is not a multiple of 16, which this model's frame sizes must be"),
    ],
)
def test_sizes_the_model_cannot_make_are_refused_before_any_work(
    clips: dict[str, Path], tmp_path: Path, changes: dict, key: str, message: str
) -> None:
    config = _run_config(clips["plain"], tmp_path, **changes)
    before = _snapshot(clips["plain"])
    with pytest.raises(ConfigError) as info:
        Trainer(config).run()
    assert str(info.value).startswith(message) and info.value.key == key
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "workspace").exists() and not (tmp_path / "out").exists()
    assert _snapshot(clips["plain"]) == before


def test_sample_sizes_matter_only_with_prompts() -> None:
    config = defaults()
    config["sampling"].update(width=70, height=70, prompts=[])
    assert size_refusals(config, 16) == []
    config["sampling"]["prompts"] = ["a cat"]
    assert [e.key for e in size_refusals(config, 16)] == ["sampling.width", "sampling.height"]
    config["sampling"].update(width=64, height=20)
    assert str(size_refusals(config, 32)[0]).endswith("(samples would be 32 pixels high); use 32")  # not 0
    config["sampling"].update(height=4095)
    assert str(size_refusals(config, 3000)[-1]).endswith("use 3000")  # not 6000: past the setting's 4096
    config.update(resolution=512)
    config["sampling"].update(width=512, height=512)
    assert size_refusals(config, 32) == []


def test_an_embedding_whose_placeholder_no_caption_holds_is_refused_before_caching(clips: dict[str, Path], tmp_path: Path) -> None:
    config = _run_config(clips["plain"], tmp_path, training_method="EMBEDDING", transformer={"train": False},
                         embedding={"placeholder_tokens": ["<concept>"], "initializer_words": ["square"]})
    before = _snapshot(clips["plain"])
    with pytest.raises(ConfigError) as info:
        Trainer(config).run()
    message = str(info.value)
    assert message == (
        f"embedding.placeholder_tokens: no training caption holds the placeholder '<concept>' (2 captions in "
        f"{clips['plain']}); write it in the captions where the concept appears, such as 'a video of <concept> "
        "walking', or set embedding.placeholder_tokens to the token the captions use"
    )
    assert info.value.key == "embedding.placeholder_tokens"
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != "file-hashes.json"]
    assert cached == [] and not (tmp_path / "out").exists()  # refused before encoding anything
    assert _snapshot(clips["plain"]) == before


def test_an_embedding_trains_when_only_some_captions_hold_the_placeholder(clips: dict[str, Path], tmp_path: Path) -> None:
    # Batches of one clip: every other batch has no placeholder, which stopped the run with
    # "element 0 of tensors does not require grad"; such a batch now trains nothing.
    config = _run_config(clips["mixed"], tmp_path, training_method="EMBEDDING", transformer={"train": False},
                         embedding={"placeholder_tokens": ["<concept>"], "initializer_words": ["square"]},
                         embedding_learning_rate=0.05)
    result = Trainer(config).run()
    assert result.steps == 4 and result.output_paths == [tmp_path / "out" / "result.safetensors"]
    assert result.output_paths[0].is_file()
