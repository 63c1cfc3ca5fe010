"""Reading metrics.jsonl back: the whole file, or only the complete lines added since last time
(for a reader polling a running job). A torn last line, left by a crash or still being written, is
skipped, never half-read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .telemetry import METRICS_FILE_NAME

log = logging.getLogger(__name__)


def _parse_lines(data: bytes, path: Path, *, final_is_complete: bool) -> list[dict[str, Any]]:
    records = []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            last = index == len(lines) - 1
            if not (last and not final_is_complete):
                log.warning("Skipping an unreadable line %d of %s", index + 1, path)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl (or the workspace folder holding it); [] if there is none.

    A torn final line (a crash mid-write, or the writer caught mid-line) is skipped silently; an
    unreadable line elsewhere is skipped with a warning.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return _parse_lines(data, path, final_is_complete=data.endswith(b"\n"))


def tail_metrics(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Records from complete lines after byte `offset`, and the offset to pass next time.

    For a reader polling a running job: a line still being written is left for the next call. If the
    file shrank (a resume dropped records), reading restarts from 0.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE_NAME
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            if size < offset:
                offset = 0
            handle.seek(offset)
            data = handle.read(size - offset)
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    return _parse_lines(data[:end], path, final_is_complete=True), offset + end
