"""Which settings the dataset doctor's report depends on: an edit that leaves probe_inputs equal is
answered by core.data.doctor_replan.replan (arithmetic only), any other by probing again.

No Qt here. core.data.doctor_replan imports only the standard library at import; the doctor's
modules are imported on first use, by then on the doctor's worker thread.
"""

from __future__ import annotations

from typing import Any

from core.data.doctor_replan import PLAN_KEYS, VIDEO_PLAN_KEYS, replan

__all__ = ["PLAN_KEYS", "VIDEO_PLAN_KEYS", "probe_inputs", "replan"]


def probe_inputs(config: dict[str, Any]) -> dict[str, Any]:
    """The settings diagnose reads, less the ones replan handles: equal inputs, equal probing.

    The model is read (base_model, model_type: its frame counts and sizes, and whether it takes
    images only); what the doctor never reads (the optimizer, LoRA, sampling...) is left out, so
    changing it does not probe the dataset again."""
    return {
        # Of a dataset only its folder: repeats is replan's, and the caption and loss options change
        # what training does with the files, not what the doctor finds in them.
        "datasets": [d.get("path") for d in config.get("datasets") or []],
        "video_config": {k: v for k, v in (config.get("video_config") or {}).items() if k not in VIDEO_PLAN_KEYS},
        **{k: config.get(k) for k in ("validation", "seed", "frames", "resolution", "strict_data", "base_model", "model_type")},
    }
