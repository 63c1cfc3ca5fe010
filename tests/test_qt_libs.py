"""installers/qt_libs.py: the system libraries Qt's xcb plugin lacks, named with the install command
of the distribution; and start.sh saying so instead of Qt's "no Qt platform plugin could be initialized".

Everything is fed: a fake ldd output, a fake /etc/os-release, a fake `ldd` on PATH for start.sh, so
the result never depends on the machine the tests run on.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from installer_support import BASH, INSTALL_SH, INSTALLERS, START_SH, STAMP_NAME

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = INSTALLERS / "qt_libs.py"

_spec = importlib.util.spec_from_file_location("qt_libs", SCRIPT)
assert _spec is not None and _spec.loader is not None
qt_libs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qt_libs)

LDD_MISSING = """\
\tlinux-vdso.so.1 (0x00007ffd4b5e9000)
\tlibQt6XcbQpa.so.6 => /venv/lib/python3.11/site-packages/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007f3c1c000000)
\tlibxcb-cursor.so.0 => not found
\tlibxcb-icccm.so.4 => not found
\tlibxcb-keysyms.so.1 => not found
\tlibxcb.so.1 => /lib/x86_64-linux-gnu/libxcb.so.1 (0x00007f3c1bfd0000)
\tlibxcb-icccm.so.4 => not found
\tlibxkbcommon-x11.so.0 => not found
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f3c1bc00000)
"""
LDD_ALL_FOUND = """\
\tlinux-vdso.so.1 (0x00007ffd4b5e9000)
\tlibxcb-cursor.so.0 => /lib/x86_64-linux-gnu/libxcb-cursor.so.0 (0x00007f3c1c000000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f3c1bc00000)
"""
OS_RELEASE = {
    "ubuntu": 'NAME="Ubuntu"\nID=ubuntu\nID_LIKE=debian\nVERSION_ID="24.04"\n',
    "debian": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n',
    "fedora": "NAME=\"Fedora Linux\"\nID=fedora\nVERSION_ID=41\n",
    "rocky": 'ID="rocky"\nID_LIKE="rhel centos fedora"\n',
    "arch": "NAME=\"Arch Linux\"\nID=arch\n",
    "manjaro": "ID=manjaro\nID_LIKE=arch\n",
    "opensuse": 'NAME="openSUSE Tumbleweed"\nID="opensuse-tumbleweed"\nID_LIKE="opensuse suse"\n',
}
EXPECTED = {
    "ubuntu": "sudo apt-get install -y libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0",
    "debian": "sudo apt-get install -y libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0",
    "fedora": "sudo dnf install -y xcb-util-cursor xcb-util-wm xcb-util-keysyms libxkbcommon-x11",
    "rocky": "sudo dnf install -y xcb-util-cursor xcb-util-wm xcb-util-keysyms libxkbcommon-x11",
    "arch": "sudo pacman -S --needed xcb-util-cursor xcb-util-wm xcb-util-keysyms libxkbcommon-x11",
    "manjaro": "sudo pacman -S --needed xcb-util-cursor xcb-util-wm xcb-util-keysyms libxkbcommon-x11",
    "opensuse": "sudo zypper install libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0",
}


def test_missing_libraries_are_read_from_ldd_once_each_in_order() -> None:
    assert qt_libs.missing_libraries(LDD_MISSING) == [
        "libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libxkbcommon-x11.so.0"]
    assert qt_libs.missing_libraries(LDD_ALL_FOUND) == []


@pytest.mark.parametrize("distro", sorted(OS_RELEASE))
def test_the_install_command_of_each_distribution(distro: str) -> None:
    family = qt_libs.distribution_family(OS_RELEASE[distro])
    command, unknown = qt_libs.install_command(qt_libs.missing_libraries(LDD_MISSING), family)
    assert command == EXPECTED[distro] and unknown == []


def test_an_unknown_distribution_or_library_is_named_without_a_guess() -> None:
    advice = qt_libs.advice(["libxcb-cursor.so.0", "libfancy.so.7"], qt_libs.distribution_family("ID=gentoo\n"))
    assert "libxcb-cursor.so.0, libfancy.so.7" in advice and "Install them with" not in advice
    assert "package manager" in advice
    advice = qt_libs.advice(["libxcb-cursor.so.0", "libfancy.so.7"], "debian")
    assert "sudo apt-get install -y libxcb-cursor0\n" in advice + "\n" and "provides libfancy.so.7" in advice


def run_script(tmp_path: Path, ldd: str, distro: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "ldd.txt").write_text(ldd, encoding="utf-8")
    (tmp_path / "os-release").write_text(OS_RELEASE[distro], encoding="utf-8")
    return subprocess.run([sys.executable, str(SCRIPT), "--ldd-output", str(tmp_path / "ldd.txt"),
                           "--os-release", str(tmp_path / "os-release")], capture_output=True, text=True, timeout=60)


def test_the_script_exits_3_with_the_command_or_0_with_nothing(tmp_path: Path) -> None:
    r = run_script(tmp_path, LDD_MISSING, "fedora")
    assert r.returncode == 3 and EXPECTED["fedora"] in r.stdout and "libxcb-cursor.so.0" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    r = run_script(tmp_path, LDD_ALL_FOUND, "fedora")
    assert r.returncode == 0 and r.stdout == ""


def test_installers_run_the_check() -> None:
    assert "installers/qt_libs.py" in START_SH.read_text() and "installers/qt_libs.py" in INSTALL_SH.read_text()


needs_bash = pytest.mark.skipif(not Path(BASH).exists(), reason="bash is needed for the installer tests")


def fake_project(tmp_path: Path, ldd_output: str) -> tuple[Path, dict[str, str]]:
    """An installed project whose python is this one, main.py a stub, and `ldd` on PATH a fake."""
    project = tmp_path / "project"
    (project / ".venv" / "bin").mkdir(parents=True)
    shutil.copytree(INSTALLERS, project / "installers")
    python = project / ".venv" / "bin" / "python"  # this Python, with its PySide6 (a symlink would lose its venv)
    python.write_text(f"#!/bin/sh\nexec '{sys.executable}' \"$@\"\n", encoding="utf-8")
    python.chmod(0o755)
    (project / ".venv" / STAMP_NAME).touch()
    (project / "main.py").write_text("print('main.py ran')\n", encoding="utf-8")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ldd.txt").write_text(ldd_output, encoding="utf-8")
    ldd = bin_dir / "ldd"
    ldd.write_text(f"#!/bin/sh\ncat '{bin_dir / 'ldd.txt'}'\n", encoding="utf-8")
    ldd.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "DISPLAY": ":99",
           "XDG_STATE_HOME": str(tmp_path / "state")}
    return project, env


@needs_bash
def test_start_sh_names_the_missing_libraries_instead_of_opening(tmp_path: Path) -> None:
    project, env = fake_project(tmp_path, LDD_MISSING)
    r = subprocess.run([BASH, str(project / "installers" / "start.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "libxcb-cursor.so.0" in r.stderr and "Then start Video Trainer again." in r.stderr
    assert "main.py ran" not in r.stdout

    # A headless command needs no window: no check, main.py runs.
    r = subprocess.run([BASH, str(project / "installers" / "start.sh"), "presets", "list"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "main.py ran" in r.stdout


@needs_bash
def test_start_sh_opens_the_window_when_nothing_is_missing(tmp_path: Path) -> None:
    project, env = fake_project(tmp_path, LDD_ALL_FOUND)
    r = subprocess.run([BASH, str(project / "installers" / "start.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "main.py ran" in r.stdout and r.stderr == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the xcb plugin is Linux's")
def test_the_plugin_is_found_without_importing_qt() -> None:
    found = subprocess.run([sys.executable, "-c", f"import runpy, sys; m = runpy.run_path({str(SCRIPT)!r}); "
                            "print(m['find_plugin']()); print('PySide6.QtCore' in sys.modules)"],
                           capture_output=True, text=True, timeout=60, env={**os.environ})
    plugin, imported = found.stdout.split()
    assert plugin.endswith("libqxcb.so") and imported == "False"
