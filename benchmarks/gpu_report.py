"""The GPU acceptance run's outputs: ratios between cases, gpu_acceptance.json and gpu_acceptance.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GIB = 2**30


def _partner(rows: list[dict[str, Any]], row: dict[str, Any], **fixed: Any) -> dict[str, Any] | None:
    """The measured row with row's settings but `fixed` ones."""
    want = {**row["settings"], **fixed}
    return next((r for r in rows if r is not row and r.get("status") == "ok" and r.get("settings") == want), None)


def compare(rows: list[dict[str, Any]]) -> None:
    """Add offload-vs-none and quantized-vs-bfloat16 ratios (step time, peak) where both cases ran."""
    for row in rows:
        if row.get("status") != "ok":
            continue
        pairs = []
        if row["settings"]["layer_offload_fraction"] > 0:
            pairs.append(("offload_vs_none", _partner(rows, row, layer_offload_fraction=0.0)))
        if row["settings"]["weight_dtype"] != "BFLOAT_16":
            pairs.append(("quantized_vs_bf16", _partner(rows, row, weight_dtype="BFLOAT_16")))
        if row["settings"]["gradient_checkpointing"] == "CPU_OFFLOADED":
            pairs.append(("cpu_offloaded_vs_on", _partner(rows, row, gradient_checkpointing="ON")))
        for name, other in pairs:
            if other is None:
                continue
            ratio: dict[str, Any] = {"against": other["case"], "step_time": row["seconds_per_step"] / other["seconds_per_step"]}
            if row.get("peak_allocated_bytes") and other.get("peak_allocated_bytes"):
                ratio["peak_allocated"] = row["peak_allocated_bytes"] / other["peak_allocated_bytes"]
            row[name] = ratio


def _gib(value: Any) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _ratio(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(result: dict[str, Any]) -> str:
    link = result["machine"]["link"]["bytes_per_second"]
    head = ("| case | status | weights | offload | checkpointing | s/step | peak alloc GiB | peak reserved GiB | est. peak GiB "
            "| est. needed GiB | measured / est. | moved GiB/step | H2D GB/s (of link) | offload vs none | quant. vs bf16 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["cases"]:
        s = r.get("settings", {})
        if r.get("status") != "ok":
            lines.append(f"| {r['case']} | {r.get('status')}: {r.get('reason', '')} | {s.get('weight_dtype', '-')} "
                         f"| {s.get('layer_offload_fraction', '-')} | {s.get('gradient_checkpointing', '-')} | - | - | - "
                         f"| {_gib(r.get('estimated_peak_bytes'))} | {_gib(r.get('estimated_needed_bytes'))} | - | - | - | - | - |")
            continue
        h2d = r.get("h2d_bytes_per_second")
        bandwidth = "-" if h2d is None else f"{h2d / 1e9:.1f} ({h2d / link:.0%})"
        offload = r.get("offload_vs_none", {}).get("step_time")
        quant = r.get("quantized_vs_bf16", {}).get("step_time")
        lines.append(
            f"| {r['case']} | ok | {s['weight_dtype']} | {s['layer_offload_fraction']} | {s['gradient_checkpointing']} "
            f"| {r['seconds_per_step']:.2f} | {_gib(r.get('peak_allocated_bytes'))} | {_gib(r.get('peak_reserved_bytes'))} "
            f"| {_gib(r['estimated_peak_bytes'])} | {_gib(r['estimated_needed_bytes'])} | {_ratio(r.get('measured_over_estimated'))} "
            f"| {_gib(r.get('offload_bytes_per_step'))} | {bandwidth} | {_ratio(offload)} | {_ratio(quant)} |")
    return "\n".join(lines)


def machine_lines(info: dict[str, Any]) -> list[str]:
    link = info["link"]
    libs = ", ".join(f"{k} {v}" for k, v in info["libraries"].items() if v)
    sdpa = ", ".join(f"{k} {'on' if v else 'off'}" for k, v in info["sdpa_enabled"].items() if v is not None)
    return [
        f"- device: {info.get('gpu', info['device'])}"
        + (f", {info['gpu_memory_bytes'] / GIB:.1f} GiB, compute capability {info['capability']}" if "gpu" in info else ""),
        f"- driver: {info.get('driver', '-')}; torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info.get('cudnn', '-')}",
        f"- attention: torch SDPA backends enabled: {sdpa}; diffusers attention backend: {info.get('diffusers_attention_backend')}",
        (f"- link reference: {'pinned ' if link['pinned'] else ''}host-to-device copy of {link['bytes'] / 2**20:.0f} MiB, "
         f"best of 5: {link['bytes_per_second'] / 1e9:.1f} GB/s"),
        f"- CUDA context (device memory used less torch's reserve at start): {_gib(info.get('cuda_context_bytes'))} GiB",
        f"- libraries: {libs}; Python {info['python']}",
    ]


def markdown(result: dict[str, Any]) -> str:
    skipped = result["skipped"]
    parts = [f"# GPU acceptance run ({result['mode']})", "", *machine_lines(result["machine"]), "",
             (f"Budget {result['budget_s']:.0f} s, took {result['elapsed_s']:.0f} s; {result['steps']} measured steps per case "
              "after one warm-up step; peak memory over the measured steps."), "", table(result), ""]
    parts.append("Skipped: " + ("; ".join(f"{r['case']} ({r.get('reason')})" for r in result["cases"] if r.get("status") == "skipped")
                                if skipped else "none") + ".")
    if result["mode"] == "dry-run":
        parts += ["", "Dry run: folders, adapters, LoRA and shapes checked on the meta device and the estimates made; nothing trained."]
    elif result["mode"] != "gpu":
        parts += ["", "No GPU: step times are the CPU's and no memory was measured; this checks that the script runs."]
    return "\n".join(parts) + "\n"


def write_outputs(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_acceptance.json", out / "gpu_acceptance.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(markdown(result), encoding="utf-8")
    return json_path, md_path
