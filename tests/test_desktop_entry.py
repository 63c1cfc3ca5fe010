"""The Linux desktop entry install.sh writes: valid, pointing at real files, whatever the project path."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from installer_support import BASH, INSTALLERS, ROOT

pytestmark = pytest.mark.skipif(not Path(BASH).exists(), reason="bash is needed for the installer tests")

# ----------------------------------------------------------------------------- desktop entry

def parse_desktop_file(text: str) -> dict[str, str]:
    lines = text.splitlines()
    assert lines[0] == "[Desktop Entry]"
    entry = {}
    for line in lines[1:]:
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("["), "only one group expected"
        key, _, value = line.partition("=")
        assert key not in entry, f"duplicate key {key}"
        entry[key] = value
    return entry


def unescape_string(value: str) -> str:
    """Desktop Entry spec, string values: \\s \\n \\t \\r \\\\."""
    out, i = [], 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            out.append({"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}.get(value[i + 1], "\\" + value[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def exec_args(value: str) -> list[str]:
    """Split an Exec value the way a launcher does (string unescape, then the quoting rules)."""
    s = unescape_string(value)
    args, cur, i, quoted, started = [], [], 0, False, False
    while i < len(s):
        c = s[i]
        if quoted:
            if c == "\\" and i + 1 < len(s) and s[i + 1] in '"`$\\':
                cur.append(s[i + 1])
                i += 2
                continue
            if c == '"':
                quoted = False
            else:
                cur.append(c)
        elif c == '"':
            quoted = started = True
        elif c == " ":
            if started:
                args.append("".join(cur))
                cur, started = [], False
        else:
            assert c not in '"`$\\', f"reserved character {c!r} must be quoted in Exec"
            cur.append(c)
            started = True
        i += 1
    assert not quoted, "unterminated quote in Exec"
    if started:
        args.append("".join(cur))
    return [a.replace("%%", "%") for a in args]


def write_desktop(project: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path / "home"), **env}
    return subprocess.run([BASH, str(project / "installers" / "install.sh"), "--desktop-only"],
                          env=full_env, capture_output=True, text=True, timeout=30)


def check_desktop_entry(path: Path, project: Path) -> None:
    entry = parse_desktop_file(path.read_text(encoding="utf-8"))
    assert entry["Type"] == "Application"
    assert entry["Name"] == "Video Trainer"
    assert entry["Terminal"] == "false"
    assert entry["Categories"] == "Graphics;Science;"
    args = exec_args(entry["Exec"])
    start = project / "installers" / "start.sh"
    assert args == [str(start)]
    assert start.is_file() and os.access(start, os.X_OK)
    icon = Path(unescape_string(entry["Icon"]))
    assert icon == project / "resources" / "icon.png"
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    validator = shutil.which("desktop-file-validate")
    if validator:
        r = subprocess.run([validator, str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_desktop_entry_is_valid(tmp_path: Path):
    data = tmp_path / "data"
    r = write_desktop(ROOT, tmp_path, XDG_DATA_HOME=str(data))
    assert r.returncode == 0, r.stderr
    target = data / "applications" / "video-trainer.desktop"
    check_desktop_entry(target, ROOT)
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".video-trainer")]
    assert leftovers == [], "temp file left behind"
    # Writing again replaces the entry in place.
    assert write_desktop(ROOT, tmp_path, XDG_DATA_HOME=str(data)).returncode == 0
    check_desktop_entry(target, ROOT)


def test_desktop_entry_defaults_to_home_local_share(tmp_path: Path):
    r = write_desktop(ROOT, tmp_path)
    assert r.returncode == 0, r.stderr
    check_desktop_entry(tmp_path / "home" / ".local" / "share" / "applications" / "video-trainer.desktop", ROOT)


def test_desktop_entry_survives_odd_project_paths(tmp_path: Path):
    project = tmp_path / 'My Projects' / 'vt $HOME "quoted" `tick` 100% back\\slash & co'
    project.mkdir(parents=True)
    shutil.copytree(INSTALLERS, project / "installers")
    shutil.copytree(ROOT / "resources", project / "resources", ignore=shutil.ignore_patterns("demo_dataset"))
    data = tmp_path / "data"
    r = write_desktop(project, tmp_path, XDG_DATA_HOME=str(data))
    assert r.returncode == 0, r.stderr
    check_desktop_entry(data / "applications" / "video-trainer.desktop", project)


def test_no_desktop_entry_when_asked(tmp_path: Path):
    data = tmp_path / "data"
    r = write_desktop(ROOT, tmp_path, XDG_DATA_HOME=str(data), VIDEO_TRAINER_NO_DESKTOP="1")
    assert r.returncode == 0
    assert "VIDEO_TRAINER_NO_DESKTOP" in r.stdout
    assert not (data / "applications" / "video-trainer.desktop").exists()
