"""Shared test setup: nothing downloads, no window needs a display, no test touches real user folders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# Set before any test module imports diffusers, transformers or Qt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

if TYPE_CHECKING:
    from engine_runs import Outcome, Runs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def user_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own per-user folders (presets, logs, state)."""
    home = tmp_path_factory.mktemp("user-home")
    monkeypatch.setenv("VIDEO_TRAINER_HOME", str(home))
    return home


def run_main(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python main.py ARGS` as a user would, capturing its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """An empty folder to put on PATH with fake tools (nvidia-smi, rocminfo) in it."""
    d = tmp_path / "bin"
    d.mkdir()
    return d


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """tiny_model(family) -> the folder of that family's tiny model (core.models.tiny, seed 0), built
    on first use and shared by the whole session. Tests only read it (copy it to change it): at the
    session's end a folder whose files changed is an error, naming the family."""
    from core.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, tuple[Path, dict[str, tuple[int, int]]]] = {}

    def folder(family: str) -> Path:
        if family not in built:
            path = build_tiny_model(family, root / family)
            built[family] = (path, _listing(path))
        return built[family][0]

    yield folder
    changed = [family for family, (path, listing) in built.items() if _listing(path) != listing]
    assert changed == [], f"tests changed the shared tiny models of {changed}; copy a model to change it"


# The engine-settings harness (tests/engine_runs.py): one tiny model, clips and cache per test module.
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator["Runs"]:
    import torch
    from engine_runs import Runs, _reset_accelerate

    # One intra-op thread: the tiny model's operations are far too small to share, and on a busy
    # two-core machine spinning worker threads made runs up to ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Runs(tmp_path_factory.mktemp("engine-options"))
    finally:
        torch.set_num_threads(threads)
        _reset_accelerate()  # the next module's runs start from a clean accelerate state


@pytest.fixture(scope="module")
def base(runs: "Runs") -> "Outcome":
    outcome = runs.run()
    assert outcome.error is None and outcome.steps == 3, outcome.error
    return outcome


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models' tensors run several times faster on one thread than split across the shared
    machine's cores. A module opts in with pytestmark = pytest.mark.usefixtures("one_torch_thread")."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
