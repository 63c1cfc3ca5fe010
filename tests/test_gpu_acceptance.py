"""benchmarks/gpu_acceptance.py --cpu-smoke: the GPU acceptance script's code on the tiny models, on a CPU.

Run as a subprocess (as on a GPU machine), it must write both files with every smoke case measured,
and import nothing of PyAV, OpenCV or Qt (a GPU lease has only torch, transformers, peft,
accelerate and the carried wheels). No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"
FORBIDDEN = ("av", "cv2", "PySide6", "PySide2", "PyQt5", "PyQt6", "shiboken6")

RUNNER = """
import json, runpy, sys
sys.argv = [{script!r}, "--cpu-smoke", "--out", {out!r}]
code = 0
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
print("MODULES " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r})))
sys.exit(code)
"""


def test_cpu_smoke_writes_both_files_with_every_smoke_case(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_cases import all_cases
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    code = RUNNER.format(script=str(SCRIPT), out=str(out), forbidden=FORBIDDEN)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    modules = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("MODULES "))[len("MODULES "):])
    assert modules == [], f"the script imported {modules}"

    result = json.loads((out / "gpu_acceptance.json").read_text(encoding="utf-8"))
    assert result["mode"] == "cpu-smoke"
    smoke = [c.name for c in all_cases() if c.smoke]
    assert [r["case"] for r in result["cases"]] == smoke
    for row in result["cases"]:
        assert row["status"] == "ok", row
        assert row["measured_steps"] >= 1 and row["seconds_per_step"] > 0
        assert row["estimated_peak_bytes"] > 0 and row["estimated_needed_bytes"] > row["estimated_peak_bytes"]
        assert row["trainable_parameters"] > 0
    families = {r["transformer_class"] for r in result["cases"]}
    assert families == {"WanTransformer3DModel", "CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel"}
    assert {r["settings"]["weight_dtype"] for r in result["cases"]} >= {"BFLOAT_16", "FLOAT_8", "NFLOAT_4"}
    assert {r["gradient_checkpointing"] for r in result["cases"]} == {"ON", "CPU_OFFLOADED"}
    info = result["machine"]
    assert set(info["sdpa_enabled"]) >= {"flash", "mem_efficient", "math"} and info["link"]["bytes_per_second"] > 0

    table = (out / "gpu_acceptance.md").read_text(encoding="utf-8")
    assert "| case | status |" in table
    for name in smoke:
        assert f"| {name} | ok |" in table


def test_dry_run_plans_real_size_cases_from_the_repo_configs(tmp_path: Path) -> None:
    """--dry-run: the real-size config-only folders, adapters, LoRA and shapes on the meta device; the
    estimate made from the folder equals the estimator's own for the preset (the built-in configs)."""
    from core.config import load_preset
    from core.memory.estimate import estimate_memory

    names = ["#wan 2.2 LoRA", "#cogvideox LoRA 12GB", "#hunyuan video LoRA 16GB"]
    out = tmp_path / "dry"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", ",".join(names), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "gpu_acceptance.json").read_text(encoding="utf-8"))["cases"]
    assert [r["case"] for r in rows] == names
    for row in rows:
        assert row["status"] == "planned", row
        assert row["estimated_peak_bytes"] == estimate_memory(load_preset(row["preset"])).peak_bytes
        assert row["parameters_built"] >= row["parameters"] > 4e9  # the real size (plus the LoRA)
    assert rows[0]["latent_shape"] == [1, 48, 5, 32, 32]  # batch 2 x 0.5 videos, 17 frames, 512 px / 16
    assert rows[0]["conditions"] == {"prompt_embeds": [1, 512, 4096], "prompt_mask": [1, 512]}
    assert rows[2]["blocks"] == 60 and "pooled_projections" in rows[2]["conditions"]
