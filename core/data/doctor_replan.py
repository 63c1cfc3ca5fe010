"""The dataset doctor's report redone for other run-length settings, without opening a file.

diagnose (core/data/doctor.py) probes every file, which takes seconds for a large dataset. What users
change while watching the overfitting gauge (max_steps, epochs, batch size, accumulation, repeats,
the video batch multiplier) changes only the arithmetic on top of what probing found: replan redoes
that arithmetic from the report's own file list with the functions diagnose uses. The window's data
tab calls it on every such edit (tests/test_gui_doctor.py checks it agrees with a fresh diagnose).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .doctor import DatasetReport

# Settings that only change the arithmetic (with each dataset's repeats); anything else the doctor
# reads means probing again.
PLAN_KEYS = ("batch_size", "gradient_accumulation_steps", "stop_after", "max_steps", "epochs")
VIDEO_PLAN_KEYS = ("video_batch_size_multiplier",)


def replan(report: DatasetReport, config: dict[str, Any]) -> DatasetReport:
    """The report with the batches, bucket plan and times seen for config's plan settings and repeats.

    config must have the same probe_inputs as the config the report was made with."""
    from .buckets import (
        SampleRecord,
        steps_per_epoch,
        total_batches,
        video_batch_size,
    )

    # diagnose's own helpers for the bucket table and the hint, so the two can never disagree.
    from .doctor import _bucket_plans, _hint, exposure_rating

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
        datasets.append(dataclasses.replace(summary, repeats=reps, times_seen=times, rating=rating, hint=_hint(rating, by_epochs, summary.unit)))

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
