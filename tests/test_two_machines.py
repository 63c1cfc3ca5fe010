"""Two "machines" on one host: two `accelerate launch --num_machines 2 --machine_rank R
--main_process_ip 127.0.0.1 --main_process_port P` commands, one process each, train the demo preset
together over the loopback address, the launch docs/training.md shows for two real machines.

The code path is a multi-machine one: the launcher's rendezvous across machines, global ranks 0 and
1 on different "machines" (the second is its machine's local main process), the caches filled by
the global main process and read by the other from the shared folder, gradients averaged over gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_ddp import _free_port, _gloo_starts

from core.train.metrics_reader import read_metrics

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


def test_two_machines_over_loopback_train_the_demo_preset(tmp_path: Path, user_home: Path) -> None:
    port = _free_port()
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VIDEO_TRAINER_HOME=str(user_home), CUDA_VISIBLE_DEVICES="",
               ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    train = ["main.py", "train", "--preset", "#demo tiny wan LoRA", "--set", f"max_steps={STEPS}",
             "--set", "sampling.every_n_steps=0", "--set", f"workspace_dir={tmp_path / 'workspace'}",
             "--set", f"cache_dir={tmp_path / 'cache'}", "--set", f"output_path={tmp_path / 'out' / 'demo.safetensors'}"]
    machines = [
        subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
             "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
             "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", *train],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = []
    try:
        for machine in machines:
            outputs.append(machine.communicate(timeout=300))
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
                machine.wait()
    codes = [m.returncode for m in machines]
    if codes != [0, 0]:
        reason = _gloo_starts()
        if reason:
            pytest.skip(reason)
    assert codes == [0, 0], "\n".join(err[-4000:] for _, err in outputs)

    info = json.loads((tmp_path / "workspace" / "run_info.json").read_text(encoding="utf-8"))
    assert info["world_size"] == 2 and info["global_batch_size"] == 2
    records = read_metrics(tmp_path / "workspace" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # The main process records the other's memory too (on a CPU: its RAM; no GPU fields).
    assert all(r["process_rss_bytes_rank1"] > 0 and "cuda_allocated_bytes_rank1" not in r for r in records)
    (first_out, _), (second_out, _) = outputs
    # The global main process (machine 0) speaks and saves; machine 1 trained beside it.
    assert f"finished: {STEPS} of {STEPS} steps" in first_out and "saved " in first_out
    assert "saved " not in second_out
    assert (tmp_path / "out" / "demo.safetensors").stat().st_size > 0
