"""TensorBoard on a workspace's event files, served on a free port of this machine only.

The window's "Open TensorBoard" starts it (once per workspace) and opens the browser at its URL;
the server is a child process ended with the window. It listens on 127.0.0.1, so nothing outside
the machine sees the run's curves. Torch-free: `python -m tensorboard.main` in a process of its own.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

from .telemetry import TENSORBOARD_DIR_NAME

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass
class TensorBoardServer:
    process: subprocess.Popen
    url: str
    logdir: Path

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """End the server (the process this module started, by its handle)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_tensorboard(workspace: Path, *, timeout_s: float = 60.0) -> TensorBoardServer:
    """TensorBoard on workspace/tensorboard, answering on localhost; UserError when it cannot start.
    An empty or missing folder is served too: TensorBoard shows the curves once a run writes them."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("TensorBoard is not installed in this environment; install it with "
                        "'pip install tensorboard' (the installers do), then try again")
    logdir = Path(workspace).expanduser() / TENSORBOARD_DIR_NAME
    port = free_port()
    url = f"http://{HOST}:{port}/"
    errors = tempfile.TemporaryFile()  # what it says if it fails; a pipe could fill and block it
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", HOST, "--port", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
    )
    server = TensorBoardServer(process, url, logdir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            errors.seek(0)
            said = errors.read().decode("utf-8", "replace").strip().splitlines()
            raise UserError(f"TensorBoard stopped as it started ({said[-1] if said else f'exit code {process.returncode}'}); "
                            "see the log file for more")
        try:
            with urllib.request.urlopen(url, timeout=1):
                log.info("TensorBoard on %s serves %s (process %d)", url, logdir, process.pid)
                return server
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    server.stop()
    raise UserError(f"TensorBoard did not answer on {url} within {timeout_s:.0f} s; try again")
