"""The command line as a user meets it: real processes, real output, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_main
from test_presets import BAD_FILES


def test_presets_list_shows_bundled_and_user_presets(user_home: Path) -> None:
    saved = run_main("presets", "save", "night run", "--preset", "#wan 2.2 LoRA", "--set", "lora.rank=8", "--description", "mine")
    assert saved.returncode == 0, saved.stderr
    assert (user_home / "presets" / "night run.json").exists()
    result = run_main("presets", "list")
    assert result.returncode == 0, result.stderr
    for name in ["#wan 2.2 LoRA", "#wan 2.2 LoRA 8GB", "#wan 2.2 Finetune", "#wan 2.2 Embedding", "#demo tiny wan LoRA"]:
        assert f"  {name}  [" in result.stdout
    user_part = result.stdout.split("Your presets")[1]
    assert "night run" in user_part and "mine" in user_part


def test_presets_show_prints_merged_settings_usable_as_config(tmp_path: Path) -> None:
    result = run_main("presets", "show", "#wan 2.2 LoRA 8GB")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["__version"] == 1
    assert shown["resolution"] == 384 and shown["transformer"]["weight_dtype"] == "FLOAT_8"
    assert shown["video_config"]["target_fps"] == 24.0  # defaults are merged in
    config_file = tmp_path / "config.json"
    config_file.write_text(result.stdout, encoding="utf-8")
    again = run_main("presets", "show", str(config_file))
    assert json.loads(again.stdout) == shown


def test_set_reads_json_values_and_text() -> None:
    result = run_main(
        "presets", "show", "#wan 2.2 LoRA",
        "--set", "lora.rank=32",
        "--set", 'sampling.prompts=["a fox", "a boat"]',
        "--set", "base_model=/models/my wan",
        "--set", "datasets=[{\"path\": \"/data/clips\", \"repeats\": 3}]",
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["lora"]["rank"] == 32
    assert shown["sampling"]["prompts"] == ["a fox", "a boat"]
    assert shown["base_model"] == "/models/my wan"
    assert shown["datasets"] == [{"path": "/data/clips", "repeats": 3, "caption_prefix": "", "caption_separator": ", ",
                                  "caption_dropout": 0.0, "loss_weight": 1.0}]


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_preset_files_give_one_line_and_nonzero_exit(kind: str, tmp_path: Path) -> None:
    content, key, words = BAD_FILES[kind]
    path = tmp_path / f"{kind}.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    before = path.read_bytes()
    result = run_main("presets", "show", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(path) in lines[0] and words in lines[0]
    assert "Traceback" not in result.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["presets", "show", "#no such preset"], "no preset named"),
        (["presets", "show", "#wan 2.2 LoRA", "--set", "lora.rank=0"], "lora.rank"),
        (["presets", "show", "#wan 2.2 LoRA", "--set", "nonsense"], "dotted.key=value"),
        (["presets", "save", "#mine"], "kept for bundled presets"),
        (["presets", "frobnicate"], "invalid choice"),
        (["tiny-model", "--family", "sd15", "--out", "x"], "invalid choice"),
        (["presets", "show", "/no/such/file.json"], "file not found"),
    ],
)
def test_mistakes_give_one_line(args: list[str], words: str) -> None:
    result = run_main(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_saving_over_a_user_preset_needs_overwrite(user_home: Path) -> None:
    assert run_main("presets", "save", "mine", "--set", "batch_size=2").returncode == 0
    path = user_home / "presets" / "mine.json"
    before = path.read_bytes()
    refused = run_main("presets", "save", "mine", "--set", "batch_size=4")
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert path.read_bytes() == before
    assert run_main("presets", "save", "mine", "--set", "batch_size=4", "--overwrite").returncode == 0
    assert json.loads(path.read_text())["batch_size"] == 4


@pytest.mark.parametrize(
    "args",
    [[], ["presets"], ["presets", "list"], ["presets", "show"], ["presets", "save"], ["presets", "delete"], ["tiny-model"], ["gui"], ["settings"]],
)
def test_help_everywhere(args: list[str]) -> None:
    result = run_main(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: main.py")


def test_unexpected_failures_are_logged_not_shown(user_home: Path) -> None:
    # A bug-shaped failure (a command that raises something no UserError explains) must reach the
    # user as one line and the log file in full: the CLI's own boundary, in a real process.
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from core.cli import build_parser, run\n"
        "parser, commands = build_parser()\n"
        "def broken(args): raise RuntimeError('a bug')\n"
        "commands.add_parser('broken').set_defaults(func=broken)\n"
        "sys.exit(run(parser, ['broken']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unexpected failure (RuntimeError: a bug)")
    assert "Traceback" not in result.stderr
    log = (user_home / "logs" / "video-trainer.log").read_text(encoding="utf-8")
    assert "Traceback" in log and "unexpected failure" in log


def test_saving_a_preset_over_a_folder_of_its_name_names_the_folder(user_home: Path) -> None:
    clash = user_home / "presets" / "clash.json"
    (clash / "inside.txt").parent.mkdir(parents=True)
    (clash / "inside.txt").write_text("mine", encoding="utf-8")
    result = run_main("presets", "save", "clash", "--overwrite")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(clash) in lines[0] and "is a folder" in lines[0], result.stderr
    assert (clash / "inside.txt").read_text(encoding="utf-8") == "mine"


def test_settings_reference_in_docs_is_current() -> None:
    result = run_main("settings", "--markdown")
    assert result.returncode == 0, result.stderr
    doc = (Path(__file__).parent.parent / "docs" / "settings.md").read_text(encoding="utf-8")
    assert result.stdout == doc, "docs/settings.md is stale: run python main.py settings --markdown > docs/settings.md"
    assert "`video_config.frame_dropout_probability`" in doc
