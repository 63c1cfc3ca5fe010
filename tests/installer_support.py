"""Shared pieces of the installer tests: paths, fake GPU drivers, and running install.sh --detect."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALLERS = ROOT / "installers"
INSTALL_SH = INSTALLERS / "install.sh"
START_SH = INSTALLERS / "start.sh"
INSTALL_BAT = INSTALLERS / "install.bat"
START_BAT = INSTALLERS / "start.bat"
STAMP_NAME = ".video-trainer-installed"

BASH = shutil.which("bash") or "/bin/bash"

NVIDIA_SMI_OUTPUT = """\
Fri Nov 21 19:40:00 2025
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}             Driver Version: {driver}     CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA GeForce RTX 4090        Off |   00000000:01:00.0  On |                  Off |
|  0%   45C    P8             20W /  450W |    1024MiB /  24564MiB |      2%      Default |
|                                         |                        |                  N/A |
+-----------------------------------------+------------------------+----------------------+
"""

ROCMINFO_OUTPUT = """\
ROCk module version 6.8.5 is loaded
=====================
HSA System Attributes
=====================
Runtime Version:         1.14
*******
Agent 2
*******
  Name:                    gfx1100
  Marketing Name:          AMD Radeon RX 7900 XTX
  Device Type:             GPU
"""

DRIVERS = {"12.8": "570.133.07", "13.0": "580.65.06", "12.9": "575.51.03", "12.6": "560.35.03",
           "12.4": "550.54.14", "12.5": "555.42.02", "11.8": "522.06"}


def write_script(path: Path, text: str, rc: int = 0) -> None:
    """A fake tool: /bin/sh with printf only, so it needs nothing from PATH."""
    lines = "".join(f"printf '%s\\n' '{line}'\n" for line in text.splitlines())
    path.write_text(f"#!/bin/sh\n{lines}exit {rc}\n")
    path.chmod(0o755)


def fake_nvidia_smi(bin_dir: Path, cuda: str, rc: int = 0) -> None:
    write_script(bin_dir / "nvidia-smi", NVIDIA_SMI_OUTPUT.format(cuda=cuda, driver=DRIVERS.get(cuda, "999.99")), rc)


def fake_rocminfo(bin_dir: Path) -> None:
    write_script(bin_dir / "rocminfo", ROCMINFO_OUTPUT)




def detect(bin_dir: Path, cwd: Path | None = None, script: str | Path = INSTALL_SH, **env: str):
    """Run install.sh --detect with PATH = only bin_dir (plus the given env vars)."""
    full_env = {"PATH": str(bin_dir), "HOME": str(bin_dir.parent), **env}
    return subprocess.run([BASH, str(script), "--detect"], env=full_env, cwd=cwd or bin_dir.parent,
                          capture_output=True, text=True, timeout=30)


def detected(bin_dir: Path, **env: str) -> list[str]:
    r = detect(bin_dir, **env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, f"--detect must print exactly one line, got {r.stdout!r}"
    return lines[0].split(" ")


def needs_no_kfd() -> None:
    # /dev/kfd (an AMD GPU on this machine) is detected as ROCm whatever PATH says.
    if Path("/dev/kfd").exists():
        pytest.skip("this machine has /dev/kfd, so it is detected as ROCm")


def sh_setting(name: str) -> str:
    m = re.search(rf'^{name}="([^"]*)"', INSTALL_SH.read_text(), re.M)
    assert m, f"{name} not found in install.sh"
    return m.group(1)


def bat_setting(name: str) -> str:
    m = re.search(rf'^set "{name}=([^"]*)"', INSTALL_BAT.read_text(), re.M)
    assert m, f"{name} not found in install.bat"
    return m.group(1)


def cuda_table() -> list[tuple[tuple[int, int], str]]:
    entries = []
    for entry in sh_setting("CUDA_TABLE").split():
        version, tag = entry.split(":")
        major, minor = version.split(".")
        entries.append(((int(major), int(minor)), tag))
    return entries
