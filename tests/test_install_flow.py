"""install.sh and start.sh: the stamp written last, a missing Python, install-once-then-run, failures."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from installer_support import BASH, INSTALL_SH, INSTALLERS, STAMP_NAME, START_SH

pytestmark = pytest.mark.skipif(not Path(BASH).exists(), reason="bash is needed for the installer tests")

# ----------------------------------------------------------------------------- install and start flow

def copy_installers(tmp_path: Path) -> Path:
    project = tmp_path / "project with spaces"
    project.mkdir()
    shutil.copytree(INSTALLERS, project / "installers")
    return project


def test_install_sh_clears_the_stamp_first_and_writes_it_last():
    text = INSTALL_SH.read_text()
    clear = text.index('rm -f -- "$STAMP"')
    for step in ("make_venv\n", "install_torch\n", '-e "$ROOT"', "write_desktop_entry\n"):
        assert clear < text.rindex(step)
    write = text.index('>"$STAMP"')
    assert write > text.rindex("write_desktop_entry\n") and write > text.rindex('-e "$ROOT"')
    assert f'STAMP="$VENV/{STAMP_NAME}"' in text


def test_install_without_python_fails_clearly(tmp_path: Path):
    project = copy_installers(tmp_path)
    r = subprocess.run([BASH, str(project / "installers" / "install.sh")],
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
                            "VIDEO_TRAINER_PYTHON": str(tmp_path / "no-such-python"),
                            "VIDEO_TRAINER_TORCH": "cpu", "VIDEO_TRAINER_NO_DESKTOP": "1"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "VIDEO_TRAINER_PYTHON" in r.stderr and "not marked as" in r.stderr
    assert not (project / ".venv" / STAMP_NAME).exists()


def make_fake_install(project: Path) -> None:
    """Replace install.sh by a stub that 'installs' a python which echoes its arguments."""
    stub = project / "installers" / "install.sh"
    stub.write_text(
        "#!/usr/bin/env bash\nset -e\n"
        'cd "$(dirname "$0")/.."\n'
        'echo "stub install ran in $PWD"\n'
        "mkdir -p .venv/bin\n"
        "printf '#!/bin/sh\\nfor a in \"$@\"; do echo \"arg:$a\"; done\\n' > .venv/bin/python\n"
        "chmod +x .venv/bin/python\n"
        f"touch .venv/{STAMP_NAME}\n"
    )


def run_start(project: Path, tmp_path: Path, *args: str, cwd: Path | None = None, script: Path | None = None):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path / "home"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    return subprocess.run([BASH, str(script or project / "installers" / "start.sh"), *args], env=env,
                          cwd=cwd or tmp_path, capture_output=True, text=True, timeout=30)


def test_start_sh_installs_once_then_runs_main_with_arguments(tmp_path: Path):
    project = copy_installers(tmp_path)
    shutil.copy2(START_SH, project / "installers" / "start.sh")
    make_fake_install(project)

    r = run_start(project, tmp_path, "a b", "--flag")
    assert r.returncode == 0, r.stderr
    # Not a terminal (captured): the install output goes to the log folder, not stdout.
    log = tmp_path / "state" / "VideoTrainer" / "log" / "install.log"
    assert "stub install ran in " + str(project) in log.read_text()
    assert r.stdout.splitlines() == [f"arg:{project / 'main.py'}", "arg:a b", "arg:--flag"]

    log.unlink()
    r = run_start(project, tmp_path, "x")
    assert r.returncode == 0 and r.stdout.splitlines() == [f"arg:{project / 'main.py'}", "arg:x"]
    assert not log.exists(), "install must not run again once the stamp exists"


def test_start_sh_through_a_symlink(tmp_path: Path):
    project = copy_installers(tmp_path)
    make_fake_install(project)
    link_dir = tmp_path / "bin"
    link_dir.mkdir()
    (link_dir / "video-trainer").symlink_to(project / "installers" / "start.sh")
    r = run_start(project, tmp_path, script=link_dir / "video-trainer", cwd=link_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"arg:{project / 'main.py'}"]


def test_start_sh_stops_when_the_install_fails(tmp_path: Path):
    project = copy_installers(tmp_path)
    (project / "installers" / "install.sh").write_text("#!/usr/bin/env bash\necho boom >&2\nexit 3\n")
    r = run_start(project, tmp_path)
    assert r.returncode != 0
    assert "boom" in (tmp_path / "state" / "VideoTrainer" / "log" / "install.log").read_text()
