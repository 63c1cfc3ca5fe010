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
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
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
