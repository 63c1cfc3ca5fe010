"""GPU acceptance run: measured peak memory against the estimate, and what offloading and quantization cost.

One command for one short GPU lease (issue 18). For each case of benchmarks/gpu_cases.py, most
important first, the real-size transformer is built on the GPU with random weights from the
repo's configs (core/memory/known_models.py; nothing is downloaded) and trained for a few steps
through the engine's own code (benchmarks/gpu_harness.py says which). Reported per case:
torch.cuda.max_memory_allocated and max_memory_reserved against estimate_memory's peak_bytes and
needed_bytes, the median step time, the offloader's bytes per step and their achieved
host-to-device bandwidth against a pinned copy's (the link's reference), and the step-time ratios
offload-vs-none and quantized-vs-bfloat16 where both cases ran.

    python3 benchmarks/gpu_acceptance.py --out DIR [--budget-s 480] [--steps 3] [--only NAME,...]
    python3 benchmarks/gpu_acceptance.py --cpu-smoke --out DIR        # tiny models on the CPU
    python3 benchmarks/gpu_acceptance.py --calibrate-from DIR/gpu_acceptance.json [--calibration FILE]

--budget-s is never overrun: before each case its time is predicted from the cases done (build
and step seconds per parameter-token), and a case that would not fit is skipped and listed;
a case stops measuring early when its next step would not fit. Writes DIR/gpu_acceptance.json and
DIR/gpu_acceptance.md (the table and the machine: GPU, driver, torch and CUDA, the SDPA backends
enabled, the library versions). It imports nothing of PyAV, OpenCV or Qt (docs/benchmarks.md: what
to carry to a machine with only torch, transformers, peft and accelerate).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

START = time.perf_counter()  # the budget counts from here: torch's and the engine's imports are in it

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_cases import Case, all_cases, case_config, fitted, settings_of
from gpu_report import compare, write_outputs

log = logging.getLogger("gpu_acceptance")
MARGIN_S = 15.0  # kept free at the end: writing the report, releasing the last case
SAFETY = 1.3  # a prediction is multiplied by this before it is compared with the time left
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "optimum-quanto", "bitsandbytes", "safetensors", "numpy")


def machine(device: Any) -> dict[str, Any]:
    """GPU, driver, torch/CUDA, attention backends enabled, library versions."""
    import importlib.metadata as md

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "device": device.type,
                            "torch": torch.__version__, "cuda": torch.version.cuda, "libraries": {}}
    for name in LIBRARIES:
        try:
            info["libraries"][name] = md.version(name)
        except md.PackageNotFoundError:
            info["libraries"][name] = None
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the context and the allocator exist now
        free, total = torch.cuda.mem_get_info(device)
        info["cuda_context_bytes"] = int(total - free - torch.cuda.memory_reserved(device))
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=False)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    sdpa = torch.backends.cuda
    info["sdpa_enabled"] = {"flash": sdpa.flash_sdp_enabled(), "mem_efficient": sdpa.mem_efficient_sdp_enabled(),
                            "math": sdpa.math_sdp_enabled(),
                            "cudnn": sdpa.cudnn_sdp_enabled() if hasattr(sdpa, "cudnn_sdp_enabled") else None}
    try:  # diffusers' attention dispatcher (the models call torch's SDPA through it, "native" by default)
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        info["diffusers_attention_backend"] = str(_AttentionBackendRegistry.get_active_backend()[0])
    except Exception:  # noqa: BLE001 - a private API: absent in other diffusers versions
        info["diffusers_attention_backend"] = None
    return info


def prepare(case: Case, smoke: bool, folders: dict[str, Path], scratch: Path) -> tuple[dict[str, Any], dict[str, Any], Any, dict[str, Any]]:
    """(settings with base_model at the model folder, the case's settings as named, the estimator's
    configs, notes) for a case; raises Skip."""
    from gpu_harness import Skip, config_only_folder

    from core.memory.known_models import configs_from_folder
    from core.models.registry import family_for_model_type

    config = case_config(case, smoke)
    family = family_for_model_type(config["model_type"])
    if family is None:
        raise Skip(f"model_type {config['model_type']} names no family")
    if family not in folders:
        where = scratch / family
        if smoke:
            from core.models.tiny import build_tiny_model

            folders[family] = build_tiny_model(family, where)
        else:
            folders[family] = config_only_folder(config["base_model"], family, where)
    needs_bnb = [k for k, v in (("transformer.weight_dtype", config["transformer"]["weight_dtype"]),
                                ("optimizer", config["optimizer"])) if v in ("NFLOAT_4", "ADAMW_8BIT")]
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        raise Skip(f"{', '.join(needs_bnb)} needs bitsandbytes, which is not importable here (docs/benchmarks.md: carry its wheel)")
    folder = folders[family]
    configs = configs_from_folder(folder)
    notes: dict[str, Any] = {}
    if case.fit_gib is not None:
        config, changes = fitted(config, configs, case.fit_gib)
        notes["fit_changes"] = changes
    named = dict(config)
    run = dict(config, base_model=str(folder))
    return run, named, configs, notes


def predict_seconds(done: list[dict[str, Any]], parameters: int, work: float, steps: int) -> float | None:
    """Build plus (1 + steps) steps of a case, from the cases done: build seconds per parameter,
    step seconds per parameter x token (their medians). None before the first case."""
    rows = [r for r in done if r.get("status") == "ok"]
    if not rows:
        return None
    build = statistics.median(r["build_seconds"] / r["parameters"] for r in rows) * parameters
    step = statistics.median(r["seconds_per_step"] / r["work"] for r in rows) * work
    return build + (1 + steps) * step


def estimate_row(config: dict[str, Any], configs: Any) -> tuple[dict[str, Any], Any]:
    from core.memory.estimate import estimate_memory
    from core.memory.model_sizes import transformer_sizes

    estimate = estimate_memory(config, configs)
    parameters = transformer_sizes(configs.transformers[0]).parameters()
    tokens = int(estimate.details["tokens"]) * int(estimate.details["batch"])
    return {"estimated_peak_bytes": estimate.peak_bytes, "estimated_needed_bytes": estimate.needed_bytes,
            "estimate_parts": estimate.parts, "estimate_details": estimate.details, "parameters": parameters,
            "tokens_total": tokens, "work": float(parameters) * tokens}, estimate


def measured_against_estimate(row: dict[str, Any], estimate: Any) -> None:
    peak = row.get("peak_allocated_bytes")
    if peak is None:
        return
    row["measured_over_estimated"] = peak / estimate.peak_bytes
    row["reserved_over_allocated"] = row["peak_reserved_bytes"] / peak
    rest = estimate.peak_bytes - estimate.parts["activations"]
    if estimate.parts["activations"] > 0:
        # What calibration scales: the measured peak less the estimate's other parts, over its activations.
        row["activation_ratio"] = (peak - rest) / (estimate.parts["activations"] / estimate.details.get("activation_factor", 1.0))


def run(args: argparse.Namespace) -> int:
    import torch

    started = START
    deadline = started + args.budget_s - MARGIN_S
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.cpu_smoke:
        log.warning("no CUDA device: running on the CPU (no memory figures); use --cpu-smoke for the tiny models")
    from gpu_harness import Skip, dry_run_case, link_bandwidth, run_case

    info = machine(device)
    info["link"] = link_bandwidth(device, 8 if device.type == "cpu" else 1024)
    cases = [c for c in all_cases() if c.smoke] if args.cpu_smoke else all_cases()
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        cases = [c for c in cases if c.name in wanted]
    rows: list[dict[str, Any]] = []
    folders: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_acceptance-") as scratch:
        for index, case in enumerate(cases, 1):
            row: dict[str, Any] = {"case": case.name, "preset": case.preset, "question": case.question, "changes": case.changes}
            rows.append(row)
            try:
                config, named, configs, notes = prepare(case, args.cpu_smoke, folders, Path(scratch))
                row.update(notes, settings=settings_of(named))
                row["gradient_checkpointing"] = config["gradient_checkpointing"]
                row["transformer_class"] = str(configs.transformers[0].get("_class_name") or "WanTransformer3DModel")
                figures, estimate = estimate_row(config, configs)
                row.update(figures)
                if args.dry_run:
                    row.update(dry_run_case(config), status="planned")
                    continue
                predicted = predict_seconds(rows[:-1], row["parameters"], row["work"], args.steps)
                row["predicted_seconds"] = predicted
                left = deadline - time.perf_counter()
                if predicted is not None and predicted * SAFETY > left:
                    row.update(status="skipped", reason=f"predicted {predicted:.0f} s, {max(left, 0):.0f} s left of the budget")
                    log.info("[%d/%d] %s: skipped (%s)", index, len(cases), case.name, row["reason"])
                    continue
                log.info("[%d/%d] %s", index, len(cases), case.name)
                began = time.perf_counter()
                row.update(run_case(config, device, steps=args.steps, warmup=1, deadline=deadline))
                row["case_seconds"] = time.perf_counter() - began
                row["status"] = "ok"
                measured_against_estimate(row, estimate)
            except Skip as e:
                row.update(status="skipped", reason=str(e))
            except torch.cuda.OutOfMemoryError as e:
                row.update(status="out_of_memory", reason=str(e).splitlines()[0][:300])
            except Exception as e:  # noqa: BLE001 - one broken case must not cost the lease's other cases
                log.error("%s failed:\n%s", case.name, traceback.format_exc())
                row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            finally:
                from gpu_harness import release

                release(device)
            log.info("  %s", {k: row.get(k) for k in ("status", "seconds_per_step", "peak_allocated_bytes", "estimated_peak_bytes", "reason") if row.get(k) is not None})
    compare(rows)
    mode = "dry-run" if args.dry_run else "cpu-smoke" if args.cpu_smoke else "gpu" if device.type == "cuda" else "cpu"
    result = {"mode": mode, "budget_s": args.budget_s, "machine": info,
              "elapsed_s": time.perf_counter() - started, "steps": args.steps, "cases": rows,
              "skipped": [r["case"] for r in rows if r.get("status") == "skipped"]}
    json_path, md_path = write_outputs(result, Path(args.out))
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path} and {md_path} in {result['elapsed_s']:.0f} s")
    return 0 if all(r.get("status") in ("ok", "skipped", "planned") for r in rows) else 1


def calibrate(source: Path, target: Path) -> int:
    from core.memory.calibration import calibration_from_results

    data = json.loads(source.read_text(encoding="utf-8"))
    if data.get("mode") != "gpu":
        print(f"{source} is not a GPU run ({data.get('mode')}): nothing to calibrate from")
        return 1
    gpu = data["machine"].get("gpu", "a GPU")
    made = calibration_from_results(data["cases"], f"{source.name}, {gpu}, torch {data['machine'].get('torch')}")
    if not made["activation_factors"]:
        print(f"{source} holds no measured case: nothing written")
        return 1
    target.write_text(json.dumps(made, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {target}: {json.dumps(made['activation_factors'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_acceptance", help="folder for gpu_acceptance.json and gpu_acceptance.md")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole run's seconds, never overrun")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per case after one warm-up step (3; 1 with --cpu-smoke)")
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--cpu-smoke", action="store_true", help="the smoke cases on the tiny models, on the CPU")
    parser.add_argument("--calibrate-from", type=Path, help="write the estimator's calibration file from this JSON")
    parser.add_argument("--calibration", type=Path, default=ROOT / "core" / "memory" / "calibration.json")
    parser.add_argument("--list", action="store_true", help="print the cases in order and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="real-size cases on the meta device: folders, adapters, LoRA, shapes and estimates, no steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.list:
        for case in all_cases():
            print(f"{case.name:45s} {case.preset:28s} {json.dumps(case.changes)}")
        return 0
    if args.calibrate_from:
        return calibrate(args.calibrate_from, args.calibration)
    if args.steps is None:
        args.steps = 1 if args.cpu_smoke else 3
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
