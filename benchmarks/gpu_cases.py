"""The cases of benchmarks/gpu_acceptance.py, most important first, and the settings each one runs.

Every case is a bundled preset (core.config.load_preset, so the case IS the preset) with some
settings changed. Order (a run stops where its --budget-s ends, so what matters most comes first):

1. the two Wan 2.2 TI2V-5B presets, "#wan 2.2 LoRA 8GB" and "#wan 2.2 LoRA";
2. on "#wan 2.2 LoRA"'s sample size, the grid cells that answer one question each against the
   preset (BFLOAT_16, offload 0, checkpointing ON): offload 0.5, FLOAT_8, NFLOAT_4, CPU_OFFLOADED,
   offload 0.9, then FLOAT_8 and NFLOAT_4 at 0.5 (quantized and offloaded against each alone);
3. one Wan 2.2 A14B expert (the high-noise one) at the settings the estimator proposes for 24 GB
   (core.memory.fit.propose_fit, "the 24 GB settings");
4. the CogVideoX and Hunyuan Video presets;
5. the rest of the grid weight_dtype BFLOAT_16 / FLOAT_8 / NFLOAT_4 x layer_offload_fraction
   0 / 0.5 / 0.9 x gradient_checkpointing ON / CPU_OFFLOADED.

--cpu-smoke runs the cases marked smoke on the tiny models (core.models.tiny) at SMOKE_SIZE.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
WAN_LORA = "#wan 2.2 LoRA"
A14B_HUB_ID = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
A14B_FIT_GIB = 24
# Tiny sizes for --cpu-smoke: a multiple of every family's size_divisor (TI2V-5B: 32), 8k + 1 frames (CogVideoX).
SMOKE_SIZE = {"resolution": 32, "frames": 9, "video_config.max_frames": 9}


@dataclass(frozen=True)
class Case:
    """One measurement: a preset with `changes` ({dotted key: value}) applied."""

    name: str
    preset: str
    changes: dict[str, Any] = field(default_factory=dict)
    question: str = ""  # what the case answers, for the table
    smoke: bool = False  # also run by --cpu-smoke
    fit_gib: float | None = None  # settings from propose_fit at this many GiB (the A14B case)


def _grid_case(dtype: str, fraction: float, checkpointing: str, question: str = "", smoke: bool = False) -> Case:
    short = {"BFLOAT_16": "bf16", "FLOAT_8": "fp8", "NFLOAT_4": "nf4"}[dtype]
    ckpt = {"ON": "ckpt", "CPU_OFFLOADED": "cpuoff"}[checkpointing]
    return Case(f"wan22-5b {short} offload{fraction:g} {ckpt}", WAN_LORA,
                {"transformer.weight_dtype": dtype, "layer_offload_fraction": fraction, "gradient_checkpointing": checkpointing},
                question, smoke)


FIRST_GRID = [
    ("BFLOAT_16", 0.5, "ON", "offload 0.5 against none"),
    ("FLOAT_8", 0.0, "ON", "FLOAT_8 against BFLOAT_16"),
    ("NFLOAT_4", 0.0, "ON", "NFLOAT_4 against BFLOAT_16"),
    ("BFLOAT_16", 0.0, "CPU_OFFLOADED", "activation offload against checkpointing ON"),
    ("BFLOAT_16", 0.9, "ON", "offload 0.9 against none"),
    ("FLOAT_8", 0.5, "ON", "FLOAT_8 offloaded"),
    ("NFLOAT_4", 0.5, "ON", "NFLOAT_4 offloaded"),
]


def all_cases() -> list[Case]:
    """Every case, in the order a run takes them."""
    cases = [
        Case("#wan 2.2 LoRA 8GB", "#wan 2.2 LoRA 8GB", question="the preset: under 8 GiB?", smoke=True),
        Case("#wan 2.2 LoRA", WAN_LORA, question="the preset", smoke=True),
    ]
    cases += [_grid_case(d, f, c, q, smoke=(d == "NFLOAT_4" and f == 0.5)) for d, f, c, q in FIRST_GRID]
    cases.append(Case("wan22-a14b high-noise expert 24GB", WAN_LORA,
                      {"base_model": A14B_HUB_ID, "model_type": "WAN_2_2_A14B_T2V", "experts.train": "HIGH_NOISE"},
                      f"one A14B expert at the settings the estimate fits in {A14B_FIT_GIB} GB", smoke=True, fit_gib=A14B_FIT_GIB))
    cases += [
        Case("#cogvideox LoRA", "#cogvideox LoRA", question="the preset (24 GB)", smoke=True),
        Case("#cogvideox LoRA 12GB", "#cogvideox LoRA 12GB", question="the preset (12 GB)"),
        Case("#hunyuan video LoRA 16GB", "#hunyuan video LoRA 16GB", question="the preset (16 GB)", smoke=True),
        Case("#hunyuan video LoRA", "#hunyuan video LoRA", question="the preset (24 GB)"),
    ]
    done = {("BFLOAT_16", 0.0, "ON")} | {(d, f, c) for d, f, c, _ in FIRST_GRID}
    for dtype, fraction, checkpointing in itertools.product(("BFLOAT_16", "FLOAT_8", "NFLOAT_4"), (0.0, 0.5, 0.9),
                                                           ("ON", "CPU_OFFLOADED")):
        if (dtype, fraction, checkpointing) not in done:
            cases.append(_grid_case(dtype, fraction, checkpointing, "grid"))
    return cases


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    node = config
    *path, last = dotted.split(".")
    for key in path:
        node = node[key]
    node[last] = value


def case_config(case: Case, smoke: bool) -> dict[str, Any]:
    """The resolved settings of a case (its preset with its changes; at SMOKE_SIZE for --cpu-smoke).
    base_model is still the hub id: the harness points it at the model folder it makes."""
    from core.config import load_preset, resolve

    config = copy.deepcopy(load_preset(case.preset))
    for key, value in {**case.changes, **(SMOKE_SIZE if smoke else {})}.items():
        set_dotted(config, key, value)
    return resolve(config)


def fitted(config: dict[str, Any], configs: Any, gib: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """config with the least slow changes that the estimate fits in gib (propose_fit), and the changes;
    unchanged when nothing fits (the case then runs as it is and says so)."""
    from core.memory.fit import propose_fit

    proposal = propose_fit(config, int(gib * GIB), configs)
    if proposal is None:
        return config, {"note": f"nothing fits {gib} GiB by the estimate"}
    changes, _ = proposal
    out = copy.deepcopy(config)
    for key, value in changes.items():
        set_dotted(out, key, value)
    return out, changes


def settings_of(config: dict[str, Any]) -> dict[str, Any]:
    """What the table compares cases by."""
    return {
        "base_model": config["base_model"], "weight_dtype": config["transformer"]["weight_dtype"],
        "layer_offload_fraction": config["layer_offload_fraction"], "gradient_checkpointing": config["gradient_checkpointing"],
        "resolution": config["resolution"], "frames": config["frames"], "batch_size": config["batch_size"],
        "lora_rank": config["lora"]["rank"], "optimizer": config["optimizer"], "train_dtype": config["train_dtype"],
    }
