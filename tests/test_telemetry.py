"""Training telemetry: step records, metrics.jsonl, TensorBoard, the client's flags, and run_info.json."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from core.train import telemetry
from core.train.events import TrainerCallbacks, TrainerCommands
from core.train.memory_readings import memory_snapshot
from core.train.metrics_reader import read_metrics, tail_metrics
from core.train.run_info import LIBRARIES, part_summary, write_run_info
from core.train.telemetry import MetricsWriter, SmoothedLoss, step_record

# --------------------------------------------------------------------------------------------------
# Records


def _record(step: int, smoother: SmoothedLoss | None = None, **extra) -> dict:
    return step_record(
        step,
        0,
        torch.tensor(0.5 + step / 100),
        [1e-4, 1e-4],
        smoother=smoother or SmoothedLoss(),
        sigmas=torch.tensor([0.2, 0.4]),
        batch_samples=4,
        seconds_per_step=2.0,
        **extra,
    )


def test_step_record_fields_and_types() -> None:
    record = _record(3, val_loss=torch.tensor(0.25), offload_bytes_per_step=123, losses={"video": torch.tensor(1.5)})
    assert record["step"] == 3 and record["epoch"] == 0
    assert isinstance(record["loss"], float) and record["loss"] == pytest.approx(0.53)
    assert record["loss_smoothed"] == pytest.approx(0.53)  # bias-corrected: the first value is the loss
    assert record["lr"] == 1e-4 and "lr_groups" not in record  # equal groups: no list
    assert record["timestep"] == pytest.approx(300.0)  # mean sigma * 1000
    assert record["seconds_per_step"] == 2.0 and record["samples_per_s"] == 2.0
    for name in ("cuda_allocated_bytes", "cuda_reserved_bytes", "cuda_peak_bytes"):
        assert name in record
        if not torch.cuda.is_available():
            assert record[name] is None
    assert isinstance(record["process_rss_bytes"], int) and record["process_rss_bytes"] > 0
    assert record["val_loss"] == 0.25 and record["offload_bytes_per_step"] == 123
    assert record["losses"] == {"video": 1.5}
    json.dumps(record, allow_nan=False)  # plain JSON types only


def test_step_record_options() -> None:
    record = step_record(1, 2, 0.1, [1e-4, 5e-4], timestep=torch.tensor([100.0, 300.0]), memory={})
    assert record["lr"] == 1e-4 and record["lr_groups"] == [1e-4, 5e-4]
    assert record["timestep"] == 200.0 and record["loss_smoothed"] is None
    assert record["samples_per_s"] is None and record["process_rss_bytes"] is None
    with pytest.raises(ValueError, match="lr_groups"):
        step_record(1, 0, 0.1, 1e-4, lr_groups=[1])


def test_memory_snapshot_rss_without_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    with_psutil = memory_snapshot()["process_rss_bytes"]
    monkeypatch.setitem(__import__("sys").modules, "psutil", None)  # import psutil -> ImportError
    without = memory_snapshot()["process_rss_bytes"]
    assert isinstance(without, int) and without > 0
    if with_psutil is not None:
        assert abs(without - with_psutil) < 256 * 2**20


def test_smoothed_loss() -> None:
    constant = SmoothedLoss(0.98)
    assert constant.value is None
    for _ in range(200):
        value = constant.update(0.7)
    assert value == pytest.approx(0.7)
    smoother = SmoothedLoss(0.9)
    assert smoother.update(1.0) == pytest.approx(1.0)  # bias-corrected at step 1
    # step 2: ema = 0.9 * 0.1 + 0.1 * 3 = 0.39, / (1 - 0.81) -> (0.09 + 0.3) / 0.19
    assert smoother.update(3.0) == pytest.approx(0.39 / 0.19)
    before = smoother.value
    assert smoother.update(float("nan")) == before  # a NaN step does not poison the curve
    restored = SmoothedLoss()
    restored.load_state_dict(smoother.state_dict())
    assert restored.update(2.0) == smoother.update(2.0)


# --------------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard


def test_metrics_jsonl_and_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    smoother = SmoothedLoss()
    with MetricsWriter(tmp_path, tensorboard=True) as writer:
        for step in range(1, 6):
            record = _record(step, smoother, losses={"video": 0.1 * step})
            writer.write(record)
            if step == 1:  # the first record goes to disk at once: the file shows up with the run
                assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1
        writer.flush()  # the rest within METRICS_FLUSH_SECONDS, or at flush(): readable while still open
        assert len(read_metrics(tmp_path / "metrics.jsonl")) == 5
    lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert {"loss", "loss_smoothed", "lr", "timestep", "process_rss_bytes", "losses/video"} <= set(tags)
    assert "step" not in tags
    loss = accumulator.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    assert loss[-1].value == pytest.approx(0.55)


def test_torn_last_line_is_skipped_and_cut_before_appending(tmp_path: Path, caplog) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in (1, 2, 3):
            writer.write(_record(step))
    path = tmp_path / "metrics.jsonl"
    with open(path, "ab") as handle:
        handle.write(b'{"step": 4, "loss": 0.5')  # a crash mid-line
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # the folder works too
    assert "unreadable" not in caplog.text  # a torn tail is expected, not worth a warning

    records, offset = tail_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert tail_metrics(path, offset) == ([], offset)

    # A resumed run cuts the torn line instead of gluing its first record onto it.
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(_record(4))
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert path.read_bytes().endswith(b"\n")
    records, offset = tail_metrics(path, offset)
    assert [r["step"] for r in records] == [4]


def test_resume_drops_unsaved_steps_and_nan_is_null(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 8):
            writer.write(_record(step))
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=5) as writer:
        writer.write(step_record(6, 0, float("nan"), 1e-4, memory={}))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] is None  # strict JSON: a diverged loss reads as null


def test_disabled_writer_creates_nothing(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "ws", enabled=False)
    writer.write(_record(1))
    writer.close()
    assert not (tmp_path / "ws").exists()
    assert read_metrics(tmp_path / "ws") == []


# --------------------------------------------------------------------------------------------------
# Client objects


def test_commands_across_threads() -> None:
    commands = TrainerCommands()
    assert not commands.stop_requested
    assert not commands.take_sample_request() and not commands.take_backup_request()

    def client() -> None:
        for _ in range(3):
            commands.request_sample()
        commands.request_backup()
        commands.request_stop()

    thread = threading.Thread(target=client)
    thread.start()
    assert commands.wait_for_stop(timeout=5)
    thread.join()
    assert commands.stop_requested
    assert commands.take_sample_request() is True  # several requests before a poll count as one
    assert commands.take_sample_request() is False
    assert commands.take_backup_request() is True
    assert commands.take_backup_request() is False
    assert commands.stop_requested  # stop is sticky


def test_each_request_is_taken_exactly_once_under_contention() -> None:
    commands = TrainerCommands()
    taken = []
    done = threading.Event()

    def poller() -> None:
        while not done.is_set() or commands_pending():
            if commands.take_sample_request():
                taken.append(1)

    def commands_pending() -> bool:
        return commands._sample  # peek at the flag to drain it

    thread = threading.Thread(target=poller)
    thread.start()
    for _ in range(50):
        commands.request_sample()
        time.sleep(0.001)
    done.set()
    thread.join(timeout=5)
    assert 1 <= len(taken) <= 50
    assert not commands.take_sample_request()


def test_callbacks_are_no_ops() -> None:
    callbacks = TrainerCallbacks()
    callbacks.on_progress(1, 10, 0, None)
    callbacks.on_metrics({})
    callbacks.on_log(logging.INFO, "x")
    callbacks.on_sample(Path("s.mp4"))
    callbacks.on_done([])
    callbacks.on_error("x")


# --------------------------------------------------------------------------------------------------
# Part summaries and run_info.json


def test_part_summary_plain_and_bf16() -> None:
    linear = torch.nn.Linear(64, 32)
    summary = part_summary(linear)
    assert summary["parameters"] == summary["trainable_parameters"] == 64 * 32 + 32
    assert summary["weight_bytes"] == (64 * 32 + 32) * 4
    assert summary["bytes_by_dtype"] == {"float32": (64 * 32 + 32) * 4}

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.BatchNorm1d(16))
    model = model.to(torch.bfloat16).requires_grad_(False)
    summary = part_summary(model)
    params = 16 * 16 + 16 + 16 * 2 + 16 * 2
    assert summary["parameters"] == params and summary["trainable_parameters"] == 0
    # Buffers count too: BatchNorm's running mean/var (bf16) and num_batches_tracked (int64).
    assert summary["bytes_by_dtype"] == {"bfloat16": (params + 32) * 2, "int64": 8}
    assert summary["weight_bytes"] == (params + 32) * 2 + 8


def test_part_summary_counts_shared_storage_once() -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(100, 8)
            self.head = torch.nn.Linear(8, 100, bias=False)
            self.head.weight = self.embed.weight

    summary = part_summary(Tied())
    assert summary["parameters"] == 800
    assert summary["weight_bytes"] == 800 * 4

    # Different Parameter objects over one buffer: halves, an overlapping view, a buffer view.
    class Views(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            flat = torch.zeros(100)
            self.a = torch.nn.Parameter(flat[:50])
            self.b = torch.nn.Parameter(flat[50:])
            self.c = torch.nn.Parameter(flat[40:60])
            self.register_buffer("d", flat[::10])

    summary = part_summary(Views())
    assert summary["parameters"] == 120  # PyTorch's count: per Parameter object
    assert summary["weight_bytes"] == 100 * 4  # the storage: once


def test_part_summary_quanto_qfloat8() -> None:
    quanto = pytest.importorskip("optimum.quanto")
    model = torch.nn.Sequential(torch.nn.Linear(256, 128))
    fp32 = part_summary(model)
    quanto.quantize(model, weights=quanto.qfloat8)
    quanto.freeze(model)
    summary = part_summary(model)
    weight_fp32 = 256 * 128 * 4
    # The weight: one byte per element plus a float32 scale per output row; the bias stays float32.
    assert summary["bytes_by_dtype"]["float8_e4m3fn"] == weight_fp32 // 4
    scales_and_bias = summary["bytes_by_dtype"]["float32"]
    assert 128 * 4 + 128 * 4 <= scales_and_bias <= 128 * 4 + 128 * 4 + 64
    assert summary["weight_bytes"] < fp32["weight_bytes"] / 3.5
    assert summary["parameters"] == fp32["parameters"]  # logical elements, not bytes
    assert summary["quantized_bytes_by_format"] == {"qfloat8_e4m3fn": weight_fp32 // 4 + 128 * 4}
    # What naive measuring would say: the full-precision size.
    assert model[0].weight.nbytes == weight_fp32


def test_part_summary_bitsandbytes_nf4() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    try:
        layer = bnb.nn.Linear4bit(256, 128, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
        layer(torch.randn(1, 256))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bitsandbytes 4-bit does not work on CPU here: {exc}")
    summary = part_summary(layer)
    assert summary["parameters"] == 256 * 128 + 128  # not the packed uint8 element count
    assert summary["trainable_parameters"] == 128  # Params4bit does not require grad
    packed = 256 * 128 // 2
    # Packed data plus per-block absmax (uint8 with compress_statistics), code tables and the bias.
    assert summary["bytes_by_dtype"]["uint8"] >= packed
    assert packed < summary["weight_bytes"] < packed + 4096
    assert set(summary["quantized_bytes_by_format"]) == {"nf4"}


def test_part_summary_peft_lora() -> None:
    peft = pytest.importorskip("peft")

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q = torch.nn.Linear(32, 32)
            self.to_v = torch.nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.to_v(self.to_q(x))

    block = Block()
    base = part_summary(block)
    wrapped = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["to_q", "to_v"]), block)
    summary = part_summary(wrapped)
    lora = 2 * (4 * 32 + 32 * 4)
    assert summary["trainable_parameters"] == lora
    assert summary["parameters"] == base["parameters"] + lora
    assert summary["weight_bytes"] == base["weight_bytes"] + lora * 4


def test_write_run_info(tmp_path: Path) -> None:
    config = {"learning_rate": 1e-4, "dataset": tmp_path / "clips", "buckets": (1, 2)}
    parts = {"transformer": torch.nn.Linear(8, 8), "text_encoder": torch.nn.Linear(4, 4).requires_grad_(False)}
    path = write_run_info(tmp_path, config, parts, {"resume_step": 0})
    assert path == tmp_path / "run_info.json"
    info = json.loads(path.read_text(encoding="utf-8"))
    assert info["settings"] == {"learning_rate": 1e-4, "dataset": str(tmp_path / "clips"), "buckets": [1, 2]}
    devices = info["devices"]
    assert devices["torch"] == torch.__version__
    assert devices["cuda_available"] is torch.cuda.is_available()
    assert isinstance(devices["cpu_count"], int) and devices["platform"]
    assert len(devices["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for gpu in devices["gpus"]:
        assert gpu["name"] and gpu["total_memory_bytes"] > 0
    assert set(info["libraries"]) == set(LIBRARIES)
    assert info["libraries"]["torch"].startswith(torch.__version__.split("+")[0])
    assert "PySide6" in info["libraries"]
    assert info["app_version"] and info["app_version"] != "unknown"
    assert "T" in info["started_at"]
    assert info["resume_step"] == 0
    assert info["parts"]["transformer"]["trainable_parameters"] == 72
    assert info["parts"]["text_encoder"] == {
        "parameters": 20,
        "trainable_parameters": 0,
        "weight_bytes": 80,
        "bytes_by_dtype": {"float32": 80},
        "bytes_by_device": {"cpu": 80},
        "quantized_bytes_by_format": {},
    }
    with pytest.raises(ValueError):
        write_run_info(tmp_path, config, parts, {"parts": {}})


def test_telemetry_loads_without_torch_for_readers() -> None:
    import subprocess
    import sys

    code = "import sys, core.train.telemetry as t, core.train.events; print('torch' in sys.modules)"
    root = Path(telemetry.__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "False", result.stderr


def test_records_reach_the_disk_within_the_flush_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader polling metrics.jsonl (tail_metrics) sees a record once METRICS_FLUSH_SECONDS have passed."""
    from core.train import telemetry

    clock = [100.0]
    monkeypatch.setattr(telemetry.time, "monotonic", lambda: clock[0])
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(_record(1))
        writer.write(_record(2))  # within the interval: buffered
        assert [r["step"] for r in read_metrics(tmp_path)] == [1]
        clock[0] += telemetry.METRICS_FLUSH_SECONDS
        writer.write(_record(3))  # the interval has passed: 2 and 3 go out
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        writer.write(_record(4))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]  # close writes the rest


def test_tensorboard_events_are_handed_over_in_batches_with_their_own_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard's thread gets the events once per METRICS_FLUSH_SECONDS, not per step, and each
    event keeps the step and wall time of its record: the curves (also on TensorBoard's relative
    and wall-time axes) are the ones per-step writes would give."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from core.train import telemetry

    clock, wall = [100.0], [5_000.0]
    monkeypatch.setattr(telemetry.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(telemetry.time, "time", lambda: wall[0])
    handed: list[int] = []
    real_add = telemetry._add_scalars

    def counting(writer: object, scalars: object, step: int, wall_time: float) -> None:
        handed.append(step)
        real_add(writer, scalars, step, wall_time)

    monkeypatch.setattr(telemetry, "_add_scalars", counting)
    with MetricsWriter(tmp_path, tensorboard=True) as writer:
        for step in (1, 2, 3):
            writer.write(_record(step))
            wall[0] += 2.5
        assert handed == [1]  # the first at once, 2 and 3 wait for the interval
        clock[0] += telemetry.METRICS_FLUSH_SECONDS
        writer.write(_record(4))
        assert handed == [1, 2, 3, 4]
        wall[0] += 2.5
        writer.write(_record(5))
    assert handed == [1, 2, 3, 4, 5]  # close hands over the rest
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    loss = accumulator.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    assert [e.wall_time for e in loss] == [5_000.0, 5_002.5, 5_005.0, 5_007.5, 5_010.0]
