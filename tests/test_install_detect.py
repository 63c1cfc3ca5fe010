"""install.sh parses, and detects the accelerator (NVIDIA CUDA by driver version, AMD ROCm, CPU) with overrides.

Detection runs `install.sh --detect` with a PATH holding nothing but fake `nvidia-smi` / `rocminfo`
scripts, so the result never depends on the machine the tests run on.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from installer_support import (
    BASH,
    INSTALL_SH,
    INSTALLERS,
    START_SH,
    cuda_table,
    detect,
    detected,
    fake_nvidia_smi,
    fake_rocminfo,
    needs_no_kfd,
    sh_setting,
    write_script,
)

pytestmark = pytest.mark.skipif(not Path(BASH).exists(), reason="bash is needed for the installer tests")

# ----------------------------------------------------------------------------- syntax

@pytest.mark.parametrize("script", [INSTALL_SH, START_SH], ids=lambda p: p.name)
def test_shell_scripts_parse_and_are_executable(script: Path):
    r = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} must be executable (chmod +x)"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert b"\r\n" not in script.read_bytes(), "CRLF line endings break bash"


def test_install_sh_help_lists_every_setting():
    r = subprocess.run([BASH, str(INSTALL_SH), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    for var in set(re.findall(r"VIDEO_TRAINER_[A-Z_]+", INSTALL_SH.read_text())):
        assert var in r.stdout, f"--help does not mention {var}"


def test_unknown_option_is_refused(bin_dir: Path):
    r = subprocess.run([BASH, str(INSTALL_SH), "--bogus"], env={"PATH": str(bin_dir)},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--bogus" in r.stderr


# ----------------------------------------------------------------------------- detection

def test_cuda_table_is_newest_first_and_has_the_usual_builds():
    table = cuda_table()
    versions = [v for v, _ in table]
    assert versions == sorted(versions, reverse=True)
    for (major, minor), tag in table:
        assert tag == f"cu{major}{minor}"
    assert {"cu128", "cu126"} <= {t for _, t in table}


@pytest.mark.parametrize("cuda,tag", [("12.8", "cu128"), ("12.9", "cu128"), ("12.6", "cu126"),
                                      ("12.5", "cu124"), ("12.4", "cu124")])
def test_nvidia_driver_picks_the_newest_index_it_supports(bin_dir: Path, cuda: str, tag: str):
    fake_nvidia_smi(bin_dir, cuda)
    assert detected(bin_dir) == ["cuda", tag, f"https://download.pytorch.org/whl/{tag}"]


def test_newest_driver_gets_the_newest_index(bin_dir: Path):
    fake_nvidia_smi(bin_dir, "13.0")
    newest = cuda_table()[0][1]
    assert detected(bin_dir) == ["cuda", newest, f"https://download.pytorch.org/whl/{newest}"]
    fake_nvidia_smi(bin_dir, "14.2")  # a future driver still gets the newest build we know
    assert detected(bin_dir)[1] == newest


def test_too_old_driver_fails_with_advice(bin_dir: Path):
    fake_nvidia_smi(bin_dir, "11.8")
    r = detect(bin_dir)
    assert r.returncode == 1 and r.stdout == ""
    assert "11.8" in r.stderr and "driver" in r.stderr and "VIDEO_TRAINER_TORCH=cpu" in r.stderr


def test_broken_nvidia_driver_falls_back_to_cpu_with_a_warning(bin_dir: Path):
    needs_no_kfd()
    write_script(bin_dir / "nvidia-smi", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", rc=9)
    assert detected(bin_dir)[:2] == ["cpu", "cpu"]
    assert "nvidia-smi" in detect(bin_dir).stderr


def test_rocm_when_rocminfo_lists_a_gpu(bin_dir: Path):
    fake_rocminfo(bin_dir)
    tag = sh_setting("ROCM_TAG")
    assert tag.startswith("rocm")
    assert detected(bin_dir) == ["rocm", tag, f"https://download.pytorch.org/whl/{tag}"]


def test_nvidia_wins_over_rocm(bin_dir: Path):
    fake_rocminfo(bin_dir)
    fake_nvidia_smi(bin_dir, "12.8")
    assert detected(bin_dir)[:2] == ["cuda", "cu128"]


def test_cpu_when_there_is_no_gpu(bin_dir: Path):
    needs_no_kfd()
    assert detected(bin_dir) == ["cpu", "cpu", "https://download.pytorch.org/whl/cpu"]


def test_cpu_override_beats_a_present_nvidia_gpu(bin_dir: Path):
    fake_nvidia_smi(bin_dir, "12.8")
    assert detected(bin_dir, VIDEO_TRAINER_TORCH="cpu")[:2] == ["cpu", "cpu"]
    assert detected(bin_dir, VIDEO_TRAINER_TORCH="CPU")[:2] == ["cpu", "cpu"]


def test_explicit_choices_without_hardware(bin_dir: Path):
    assert detected(bin_dir, VIDEO_TRAINER_TORCH="rocm")[0] == "rocm"
    # cuda without a readable driver (e.g. preparing an image): newest build, with a warning.
    assert detected(bin_dir, VIDEO_TRAINER_TORCH="cuda")[:2] == ["cuda", cuda_table()[0][1]]
    fake_nvidia_smi(bin_dir, "12.6")
    assert detected(bin_dir, VIDEO_TRAINER_TORCH="cuda")[:2] == ["cuda", "cu126"]
    assert detected(bin_dir, VIDEO_TRAINER_TORCH="auto")[:2] == ["cuda", "cu126"]


def test_invalid_choice_is_refused(bin_dir: Path):
    r = detect(bin_dir, VIDEO_TRAINER_TORCH="tpu")
    assert r.returncode == 1 and "VIDEO_TRAINER_TORCH" in r.stderr


@pytest.mark.parametrize("url,variant,tag", [
    ("https://mirror.example.com/pytorch/whl/cu126", "cuda", "cu126"),
    ("https://mirror.example.com/pytorch/whl/cu126/", "cuda", "cu126"),
    ("https://download.pytorch.org/whl/nightly/rocm6.4", "rocm", "rocm6.4"),
    ("http://10.0.0.5:8080/simple", "custom", "custom"),
    ("file:///srv/wheels/cpu", "cpu", "cpu"),
    ("https://x.example/cuda", "custom", "custom"),
])
def test_torch_index_is_used_verbatim(bin_dir: Path, url: str, variant: str, tag: str):
    fake_nvidia_smi(bin_dir, "12.8")  # must not matter
    assert detected(bin_dir, VIDEO_TRAINER_TORCH_INDEX=url) == [variant, tag, url]


def test_torch_index_with_an_explicit_variant(bin_dir: Path):
    url = "https://mirror.example.com/simple"
    assert detected(bin_dir, VIDEO_TRAINER_TORCH_INDEX=url, VIDEO_TRAINER_TORCH="cuda") == ["cuda", "custom", url]


def test_detect_works_from_any_directory_and_by_relative_path(bin_dir: Path, tmp_path: Path):
    fake_nvidia_smi(bin_dir, "12.8")
    r = detect(bin_dir, cwd=INSTALLERS, script="install.sh")
    assert r.returncode == 0 and r.stdout.split()[1] == "cu128", r.stderr
    r = detect(bin_dir, cwd=tmp_path, script=os.path.relpath(INSTALL_SH, tmp_path))
    assert r.returncode == 0 and r.stdout.split()[1] == "cu128", r.stderr
