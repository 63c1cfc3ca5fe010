"""How much the CLI's light commands cost over a bare Python start, as a ratio in one run.

`presets list` and `settings` must not import torch, diffusers or Qt: they should cost little more
than starting Python. Each command is run N times, alternating with the reference
(`python -c pass`), and the ratio of medians is reported, so machine noise affects both alike.

    python benchmarks/cli_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "reference: python -c pass": [sys.executable, "-c", "pass"],
    "main.py presets list": [sys.executable, str(ROOT / "main.py"), "presets", "list"],
    "main.py settings": [sys.executable, str(ROOT / "main.py"), "settings"],
    "main.py presets show '#wan 2.2 LoRA 8GB'": [sys.executable, str(ROOT / "main.py"), "presets", "show", "#wan 2.2 LoRA 8GB"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    env = {**os.environ, "VIDEO_TRAINER_HOME": tempfile.mkdtemp(prefix="vt-bench-")}
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, command in COMMANDS.items():  # alternating, so drift hits every command alike
            start = time.perf_counter()
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["reference: python -c pass"])
    print(f"{'command':45} {'median s':>9} {'x reference':>12}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:45} {median:9.3f} {median / reference:12.2f}")


if __name__ == "__main__":
    main()
