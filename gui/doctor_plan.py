"""Which settings the dataset doctor's report depends on, and the cheap part of it done again.

The doctor (core.data.doctor.diagnose) probes every file, which takes seconds for a large dataset.
Most of what users change while looking at the overfitting gauge (max_steps, epochs, batch size,
repeats) does not change what probing found, only the arithmetic on top of it: `replan` redoes that
arithmetic from the report's own file list with core's functions (steps_per_epoch, total_batches,
exposure_rating), the same ones diagnose uses, so no file is opened again. tests/test_gui_doctor.py
checks that replan(report, B) agrees with diagnose(B).

No Qt here. core.data.doctor (numpy, PyAV's helpers) is imported on first use, not with the window:
by then the doctor's worker thread has imported it.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.data.doctor import DatasetReport

# Settings that only change the arithmetic (with each dataset's repeats); anything else the doctor
# reads means probing again.
PLAN_KEYS = ("batch_size", "gradient_accumulation_steps", "stop_after", "max_steps", "epochs")
VIDEO_PLAN_KEYS = ("video_batch_size_multiplier",)


def probe_inputs(config: dict[str, Any]) -> dict[str, Any]:
    """The settings diagnose reads, less the ones replan handles: equal inputs, equal probing.

    What the doctor never reads (the model, the optimizer, LoRA, sampling...) is left out too, so
    changing it does not probe the dataset again."""
    return {
        "datasets": [{k: v for k, v in d.items() if k != "repeats"} for d in config.get("datasets") or []],
        "video_config": {k: v for k, v in (config.get("video_config") or {}).items() if k not in VIDEO_PLAN_KEYS},
        **{k: config.get(k) for k in ("validation", "seed", "frames", "resolution", "strict_data")},
    }


def replan(report: DatasetReport, config: dict[str, Any]) -> DatasetReport:
    """The report with the batches, bucket plan and times seen for config's plan settings and repeats.

    config must have the same probe_inputs as the config the report was made with."""
    from core.data.buckets import (
        SampleRecord,
        steps_per_epoch,
        total_batches,
        video_batch_size,
    )

    # diagnose's own helpers for the bucket table and the hint, so the two can never disagree; a
    # public core.data.doctor.replan() would be their proper home.
    from core.data.doctor import _bucket_plans, _hint, exposure_rating

    repeats = [int(d.get("repeats", 1)) for d in config.get("datasets") or []]
    records = [
        SampleRecord(i, f.bucket, repeats[f.dataset_index] if f.dataset_index < len(repeats) else 1, f.kind == "video")
        for i, f in enumerate(f for f in report.files if f.split == "train")
    ]
    batch_size = int(config["batch_size"])
    multiplier = float(config["video_config"]["video_batch_size_multiplier"])
    per_pass = steps_per_epoch(records, batch_size, multiplier) if records else 0
    batches = total_batches(config, records) if records else 0
    passes = batches / per_pass if per_pass else 0.0
    by_epochs = config.get("stop_after") == "EPOCHS"

    datasets = []
    for summary in report.datasets:
        reps = repeats[summary.index] if summary.index < len(repeats) else summary.repeats
        has_items = bool(summary.clips + summary.images)
        times = passes * reps if has_items else 0.0
        rating = exposure_rating(times) if has_items else ""
        datasets.append(dataclasses.replace(summary, repeats=reps, times_seen=times, rating=rating, hint=_hint(rating, by_epochs)))

    settings = copy.deepcopy(report.settings)
    settings.update({k: config.get(k) for k in PLAN_KEYS})
    settings["video_batch_size"] = video_batch_size(batch_size, multiplier)
    accumulation = int(config.get("gradient_accumulation_steps", 1))
    return dataclasses.replace(
        report,
        datasets=datasets,
        buckets=_bucket_plans(records, batch_size, multiplier),
        batches_per_pass=per_pass,
        total_batches=batches,
        optimizer_steps=batches // accumulation,
        settings=settings,
    )
