"""The Windows scripts stay in step with the Linux ones: CRLF, labels, the same settings and CUDA table.

Where Wine is installed, install.bat --detect also runs against the same fake drivers and must
agree with install.sh; that takes about a minute, so it runs only with VT_TEST_WINE=1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from installer_support import (
    BASH,
    DRIVERS,
    INSTALL_BAT,
    INSTALL_SH,
    NVIDIA_SMI_OUTPUT,
    ROOT,
    STAMP_NAME,
    START_BAT,
    bat_setting,
    detected,
    fake_nvidia_smi,
    needs_no_kfd,
    sh_setting,
)

pytestmark = pytest.mark.skipif(not Path(BASH).exists(), reason="bash is needed for the installer tests")

# ----------------------------------------------------------------------------- Windows scripts

def test_bat_files_use_crlf_line_endings():
    # cmd.exe can miss labels (goto/call) in LF-only files.
    for bat in (INSTALL_BAT, START_BAT):
        data = bat.read_bytes()
        assert data.count(b"\n") == data.count(b"\r\n") > 10, f"{bat.name} needs CRLF line endings"
        assert data.startswith(b"@echo off\r\n")


def test_bat_labels_exist():
    for bat in (INSTALL_BAT, START_BAT):
        text = bat.read_text()
        labels = {m.lower() for m in re.findall(r"^:(\w+)", text, re.M)}
        for target in re.findall(r"\b(?:goto|call)\s+:(\w+)", text, re.I):
            assert target.lower() == "eof" or target.lower() in labels, f"{bat.name}: no label :{target}"


def test_install_bat_and_install_sh_share_settings():
    sh, bat = INSTALL_SH.read_text(), INSTALL_BAT.read_text()
    assert set(re.findall(r"VIDEO_TRAINER_[A-Z_]+", sh)) == set(re.findall(r"VIDEO_TRAINER_[A-Z_]+", bat))
    for name in ("CUDA_TABLE", "TORCH_VERSION_DEFAULT", "TORCH_INDEX_BASE"):
        assert sh_setting(name) == bat_setting(name), f"{name} differs between install.sh and install.bat"


def test_default_torch_version_matches_the_tested_pin():
    pins = re.findall(r"^torch==(\S+)", (ROOT / "constraints" / "test-cpu.txt").read_text(), re.M)
    assert pins == [sh_setting("TORCH_VERSION_DEFAULT")]


def test_install_bat_steps():
    text = INSTALL_BAT.read_text()
    assert f'set "STAMP=%VENV%\\{STAMP_NAME}"' in text
    clear = text.index('del /f /q "%STAMP%"')
    write = text.index('> "%STAMP%" echo')
    deps = text.index("-m pip install --constraint")
    shortcut = text.index("call :make_shortcut")
    assert clear < text.index("call :make_venv") < text.index("call :install_torch") < deps < shortcut < write
    # Shortcut: pythonw (no console) running main.py in the project, with the .ico.
    for marker in ("WScript.Shell", "CreateShortcut", "'Video Trainer.lnk'", "'.venv\\Scripts\\pythonw.exe'",
                   "$s.Arguments = 'main.py'", "$s.WorkingDirectory = $root", "'resources\\icon.ico'",
                   "GetFolderPath('Desktop')"):
        assert marker in text, marker
    for marker in ("py -3", "nvidia-smi", "--index-url", "--detect", "VIDEO_TRAINER_NO_DESKTOP"):
        assert marker in text, marker


def test_start_bat_steps():
    text = START_BAT.read_text()
    assert f'if exist "%ROOT%\\.venv\\{STAMP_NAME}" goto :run' in text
    assert 'call "%ROOT%\\installers\\install.bat"' in text
    assert 'start "" "%ROOT%\\.venv\\Scripts\\pythonw.exe" "%ROOT%\\main.py" %*' in text
    assert (ROOT / "resources" / "icon.ico").read_bytes()[:4] == b"\x00\x00\x01\x00"


# ----------------------------------------------------------------------------- install.bat under Wine

def _wine() -> str | None:
    for cand in (shutil.which("wine64"), shutil.which("wine"), "/usr/lib/wine/wine64"):
        if cand and Path(cand).exists():
            return cand
    return None


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory):
    if os.environ.get("VT_TEST_WINE") != "1":
        pytest.skip("set VT_TEST_WINE=1 (and install Wine) to run install.bat under Wine")
    exe = _wine()
    if not exe:
        pytest.skip("Wine is not installed; install.bat is only checked statically")
    prefix = os.environ.get("VT_TEST_WINEPREFIX") or str(tmp_path_factory.mktemp("wineprefix"))
    env = {**os.environ, "WINEPREFIX": prefix, "WINEDEBUG": "-all", "WINEDLLOVERRIDES": "mscoree,mshtml="}

    def run_bat(fake_dir: Path | None, **extra: str) -> subprocess.CompletedProcess:
        bat = "Z:" + str(INSTALL_BAT).replace("/", "\\")
        e = {**env, **extra}
        if fake_dir is not None:
            e["WINEPATH"] = "Z:" + str(fake_dir).replace("/", "\\")
        return subprocess.run([exe, "cmd", "/c", bat, "--detect"], env=e, capture_output=True,
                              text=True, timeout=180, stdin=subprocess.DEVNULL)

    return run_bat


def fake_nvidia_smi_bat(d: Path, cuda: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    body = "".join("echo " + line.replace("%", "%%").replace("|", "^|").replace(">", "^>") + "\r\n"
                   for line in NVIDIA_SMI_OUTPUT.format(cuda=cuda, driver=DRIVERS.get(cuda, "999.99")).splitlines())
    (d / "nvidia-smi.bat").write_bytes(("@echo off\r\n" + body + "exit /b 0\r\n").encode())


@pytest.mark.parametrize("cuda", ["13.0", "12.9", "12.6", "12.4"])
def test_install_bat_detects_like_install_sh(wine, tmp_path: Path, bin_dir: Path, cuda: str):
    fake_nvidia_smi_bat(tmp_path / "win", cuda)
    fake_nvidia_smi(bin_dir, cuda)
    r = wine(tmp_path / "win")
    assert r.stdout.strip().split() == detected(bin_dir), r.stderr


def test_install_bat_overrides_like_install_sh(wine, tmp_path: Path, bin_dir: Path):
    needs_no_kfd()
    fake_nvidia_smi_bat(tmp_path / "win", "12.8")
    assert wine(tmp_path / "win", VIDEO_TRAINER_TORCH="cpu").stdout.split() == ["cpu", "cpu", "https://download.pytorch.org/whl/cpu"]
    url = "https://mirror.example.com/pytorch/whl/cu126/"
    assert wine(None, VIDEO_TRAINER_TORCH_INDEX=url).stdout.split() == detected(bin_dir, VIDEO_TRAINER_TORCH_INDEX=url)
    assert wine(None).stdout.split() == detected(bin_dir)  # no GPU
    r = wine(None, VIDEO_TRAINER_TORCH="rocm")  # no ROCm on Windows
    assert r.returncode == 1 and "ROCm" in r.stderr
