"""Measured corrections to the estimator's activation term, per transformer class and checkpointing mode.

The file (core/memory/calibration.json by default) is written by
`python benchmarks/gpu_acceptance.py --calibrate-from gpu_acceptance.json` from a GPU run's JSON:

    {"version": 1,
     "activation_factors": {"<transformer class>": {"ON": {"factor": 1.07, "cases": 4, "source": "..."}}}}

`factor` is the median, over that run's cases of the class and mode, of measured activations
(torch.cuda.max_memory_allocated less the estimate's weights, trainable state and workspace) over
the estimate's activations. estimate_memory multiplies its activation term by it. Without the file,
or without an entry for the class and mode, the estimate is unchanged (factor 1.0). No entry is
committed until a GPU run has measured one (docs/memory.md).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CALIBRATION_PATH = Path(__file__).with_name("calibration.json")
VERSION = 1


def load_calibration(path: str | Path | None = None) -> dict[str, dict[str, float]]:
    """{transformer class: {checkpointing mode: factor}} from a calibration file; {} when it is
    missing or unreadable (an unreadable one is logged: the estimate then stays uncalibrated)."""
    file = Path(path if path is not None else CALIBRATION_PATH)
    try:
        stamp = file.stat().st_mtime_ns
    except OSError:
        return {}
    return dict(_load(str(file), stamp))


@functools.lru_cache(maxsize=8)
def _load(path: str, stamp: int) -> dict[str, dict[str, float]]:
    """Read once per path and modification time (every estimate asks; --fit asks dozens of times)."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        factors = data.get("activation_factors", {})
        return {cls: {mode: float(entry["factor"]) for mode, entry in modes.items()} for cls, modes in factors.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("calibration file %s cannot be read (%s); the memory estimate is uncalibrated", file, e)
        return {}


def activation_factor(transformer_class: str, checkpointing: str, calibration: dict[str, dict[str, float]] | None = None) -> float:
    """The factor for a class and checkpointing mode (1.0 without an entry). calibration: a
    load_calibration() result; default the file at CALIBRATION_PATH."""
    table = load_calibration() if calibration is None else calibration
    return float(table.get(transformer_class, {}).get(checkpointing, 1.0))


def calibration_from_results(rows: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """The calibration file's content from gpu_acceptance rows: per (class, checkpointing) the
    median measured-over-estimated activation ratio of the rows that measured a peak."""
    import statistics

    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        ratio = row.get("activation_ratio")
        if row.get("status") == "ok" and ratio is not None and ratio > 0:
            groups.setdefault((row["transformer_class"], row["gradient_checkpointing"]), []).append(float(ratio))
    factors: dict[str, dict[str, Any]] = {}
    for (cls, mode), ratios in sorted(groups.items()):
        factors.setdefault(cls, {})[mode] = {"factor": round(statistics.median(ratios), 4), "cases": len(ratios), "source": source}
    return {"version": VERSION, "activation_factors": factors}
