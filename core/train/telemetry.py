"""Per-step training metrics: one JSON line per optimizer step in metrics.jsonl, plus TensorBoard.

The engine builds a record with `step_record(...)` after each optimizer step, writes it with
`MetricsWriter.write(record)` and hands the same dict to `TrainerCallbacks.on_metrics`. The fields and
their units are listed in docs/training.md ("Telemetry").

metrics.jsonl reaches the disk at most METRICS_FLUSH_SECONDS after a record and at every flush(); the
same holds for TensorBoard's events, which are handed to its writer thread in batches (see
MetricsWriter). A crash loses at most that last second, which resume drops anyway (the loop flushes
after each backup). Reading it back: core/train/metrics_reader.py; the memory fields:
core/train/memory_readings.py.

torch and tensorboard are imported only when needed, so reading metrics does not load torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from core.atomic import explained_write_errors, write_bytes_atomic, write_failure

from .memory_readings import MEMORY_FIELDS, memory_snapshot

log = logging.getLogger(__name__)

METRICS_FILE_NAME = "metrics.jsonl"
TENSORBOARD_DIR_NAME = "tensorboard"
LOSS_SMOOTHING = 0.98  # EMA factor of loss_smoothed: about the last 50 steps weigh in
TENSORBOARD_FLUSH_SECONDS = 10
# metrics.jsonl reaches the disk, and TensorBoard's writer thread gets the events, at most this long
# after a record (and at every flush(): the loop flushes after each backup, so a crash loses only
# records that resume drops anyway). Per step, the flush cost a system call (0.1 ms, 0.7 % of the tiny
# model's step) and each hand-over woke TensorBoard's thread, which then competed with training for
# the GIL (0.15 ms a step on an idle machine, milliseconds on a loaded one).
METRICS_FLUSH_SECONDS = 1.0
# Fields that are the record's coordinates rather than curves: not written as TensorBoard scalars.
_NOT_SCALARS = frozenset({"step"})
# The memory fields `memory_snapshot` fills; extra fields may not overwrite the record's own fields.
CORE_FIELDS = (
    "step",
    "epoch",
    "loss",
    "loss_smoothed",
    "lr",
    "timestep",
    "samples_per_s",
    "seconds_per_step",
    *MEMORY_FIELDS,
)


# --------------------------------------------------------------------------------------------------
# Smoothing


class SmoothedLoss:
    """Exponential moving average of the loss, bias-corrected (as Adam corrects its moments).

    ema_n = beta * ema_{n-1} + (1 - beta) * loss_n, ema_0 = 0; value = ema_n / (1 - beta ** n).
    The correction makes the value exact from the first step (value_1 = loss_1) and a constant loss
    gives that constant. Non-finite losses (NaN, inf) are not folded in, so one bad step does not
    poison the curve; `value` stays where it was.
    """

    def __init__(self, beta: float = LOSS_SMOOTHING) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.count = 0
        self._ema = 0.0

    def update(self, loss: float) -> float | None:
        """Fold in one loss; return the smoothed value (None while no finite loss was seen)."""
        loss = float(loss)
        if math.isfinite(loss):
            self.count += 1
            self._ema = self.beta * self._ema + (1.0 - self.beta) * loss
        return self.value

    @property
    def value(self) -> float | None:
        if self.count == 0:
            return None
        return self._ema / (1.0 - self.beta**self.count)

    def state_dict(self) -> dict[str, float]:
        """For resumable checkpoints, so the curve continues smoothly after a resume."""
        return {"beta": self.beta, "count": self.count, "ema": self._ema}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.count = int(state["count"])
        self._ema = float(state["ema"])


# --------------------------------------------------------------------------------------------------
# Records


def _to_number(value: Any) -> Any:
    """A one-element tensor or a numpy scalar -> a Python number; other values unchanged."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(getattr(value, "item", None)):
        count = value.numel() if callable(getattr(value, "numel", None)) else getattr(value, "size", None)
        if count == 1:
            return value.item()
    return value


def _mean(values: Any) -> float:
    """Mean of a tensor, numpy array, sequence or number, as a Python float."""
    if hasattr(values, "detach"):  # a torch tensor
        return float(values.detach().float().mean().item())
    if hasattr(values, "mean") and hasattr(values, "shape"):  # numpy
        return float(values.mean())
    if isinstance(values, Iterable) and not isinstance(values, (str, bytes)):
        items = [float(v) for v in values]
        return sum(items) / len(items) if items else float("nan")
    return float(values)


def _first_lr(lr: Any) -> tuple[float | None, list[float] | None]:
    if lr is None:
        return None, None
    if isinstance(lr, (list, tuple)):
        values = [float(v) for v in lr]
        if not values:
            return None, None
        return values[0], (values if len(set(values)) > 1 else None)
    return float(_to_number(lr)), None


def step_record(
    step: int,
    epoch: int,
    loss: Any,
    lr: Any,
    *,
    smoother: SmoothedLoss | None = None,
    loss_smoothed: float | None = None,
    timestep: Any = None,
    sigmas: Any = None,
    batch_samples: int | None = None,
    seconds_per_step: float | None = None,
    samples_per_s: float | None = None,
    memory: Mapping[str, int | None] | None = None,
    device: Any = None,
    reset_cuda_peak: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """The metrics record of one optimizer step (see docs/training.md "Telemetry" for every field).

    - loss: float or tensor (a tensor is read with .item(), which waits for the GPU).
    - lr: float, or the learning rates of the optimizer's param groups (a list): `lr` is the first
      group's; when the groups differ, the list is kept as `lr_groups`.
    - loss_smoothed: taken as given, else `smoother.update(loss)`, else None.
    - timestep: mean of `sigmas * 1000` when `sigmas` (tensor/sequence of the batch's sigmas in
      [0, 1]) is given; else the mean of `timestep` (a number or the batch's timesteps); else None.
    - seconds_per_step: wall seconds of this optimizer step (all its accumulation micro-batches).
      samples_per_s: as given, else batch_samples / seconds_per_step, where batch_samples is the
      number of samples the optimizer step consumed (batch size x gradient accumulation).
    - memory: a `memory_snapshot()` taken by the caller; else one is taken now (for `device`).
    - extra: more fields (val_loss, offload_bytes_per_step, per-part losses as a dict, ...). 0-d
      tensors become numbers. They may not reuse the names of the fields above.
    """
    clash = sorted(set(extra) & (set(CORE_FIELDS) | {"lr_groups"}))
    if clash:
        raise ValueError(f"extra metrics fields reuse record field names: {clash}")
    loss_value = float(_to_number(loss)) if loss is not None else None
    if loss_smoothed is None and smoother is not None and loss_value is not None:
        loss_smoothed = smoother.update(loss_value)
    lr_value, lr_groups = _first_lr(lr)
    if sigmas is not None:
        timestep_value: float | None = _mean(sigmas) * 1000.0
    elif timestep is not None:
        timestep_value = _mean(timestep)
    else:
        timestep_value = None
    if samples_per_s is None and batch_samples and seconds_per_step:
        samples_per_s = batch_samples / seconds_per_step
    if memory is None:
        memory = memory_snapshot(device, reset_cuda_peak=reset_cuda_peak)

    record: dict[str, Any] = {
        "step": int(step),
        "epoch": int(epoch),
        "loss": loss_value,
        "loss_smoothed": None if loss_smoothed is None else float(loss_smoothed),
        "lr": lr_value,
        "timestep": timestep_value,
        "samples_per_s": None if samples_per_s is None else float(samples_per_s),
        "seconds_per_step": None if seconds_per_step is None else float(seconds_per_step),
    }
    for name in MEMORY_FIELDS:
        value = memory.get(name)
        record[name] = None if value is None else int(value)
    if lr_groups is not None:
        record["lr_groups"] = lr_groups
    for name, value in extra.items():
        if isinstance(value, Mapping):
            record[name] = {str(k): _to_number(v) for k, v in value.items()}
        else:
            record[name] = _to_number(value)
    return record


def _json_safe(value: Any) -> Any:
    """Strict JSON: NaN and infinities become null (the loss of a diverged step reads as null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    value = _to_number(value)
    if isinstance(value, (int, float)):
        return _json_safe(value)
    return str(value)


def _scalars(record: Mapping[str, Any]) -> Iterable[tuple[str, float]]:
    """(tag, value) for every numeric field; dicts become 'name/key', lists 'name/index'."""
    for name, value in record.items():
        if name in _NOT_SCALARS:
            continue
        if isinstance(value, Mapping):
            items: Iterable[tuple[str, Any]] = ((f"{name}/{k}", v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            items = ((f"{name}/{i}", v) for i, v in enumerate(value))
        else:
            items = ((name, value),)
        for tag, item in items:
            item = _to_number(item)
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                yield tag, float(item)


# --------------------------------------------------------------------------------------------------
# Writing


class MetricsWriter:
    """Appends step records to workspace_dir/metrics.jsonl and scalars to workspace_dir/tensorboard/.

    - enabled=False: write() does nothing (no files are created).
    - tensorboard=False, or tensorboard not installed: only metrics.jsonl.
    - resume_step: when resuming from a checkpoint saved at that step, records after it (steps the
      crashed or stopped run did but did not save) are dropped from metrics.jsonl, and TensorBoard
      is told to purge them too, so curves do not double back.
    An existing metrics.jsonl is appended to; a torn last line left by a crash is cut off first.
    TensorBoard's events are collected and handed to its writer thread once per
    METRICS_FLUSH_SECONDS (and at flush() and close()), each with its own step and wall time, so
    TensorBoard shows the same curves; its thread wakes once a second instead of every step.
    A failed write when the writer opens its files raises UserError naming the path (the run has
    not started); one later (disk full) is logged once as a warning and does not stop training.
    Use from one thread (the training thread); `close()` (or a with-block) at the end.
    """

    def __init__(
        self,
        workspace_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.workspace_dir = Path(workspace_dir)
        self.path = self.workspace_dir / METRICS_FILE_NAME
        self.tensorboard_dir = self.workspace_dir / TENSORBOARD_DIR_NAME
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._tb_pending: list[tuple[int, float, list[tuple[str, float]]]] = []  # (step, wall time, scalars)
        self._tb_handed = -math.inf  # the first record goes to TensorBoard at once
        self._warned = False
        if not enabled:
            return
        # At the start a failed write stops the run, in one line: backups could not be written either.
        with explained_write_errors(self.path, "the metrics", key="workspace_dir"):
            self.workspace_dir.mkdir(parents=True, exist_ok=True)
            _prepare_for_append(self.path, resume_step)
            # newline="\n": the same bytes on Windows; buffered, flushed by write() and flush().
            self._file = open(self.path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115
            self._flushed = -math.inf  # the first record goes to disk at once
        if tensorboard:
            with explained_write_errors(self.tensorboard_dir, "the TensorBoard folder", key="workspace_dir"):
                self._tb = _open_summary_writer(self.tensorboard_dir, resume_step)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (a line of metrics.jsonl) and its numeric fields to TensorBoard."""
        if self._file is None:
            return
        line = json.dumps(_json_safe(dict(record)), ensure_ascii=False, allow_nan=False)
        try:
            self._file.write(line + "\n")
            now = time.monotonic()
            if now - self._flushed >= METRICS_FLUSH_SECONDS:
                self._file.flush()
                self._flushed = now
        except OSError as exc:
            explained = write_failure(exc, self.path, "the metrics", key="workspace_dir")
            self._warn_once(str(explained) if explained is not None else f"could not append to {self.path}: {exc}")
        if self._tb is not None:
            # Each event keeps its own step and wall time; only the hand-over waits (the docstring).
            self._tb_pending.append((int(record.get("step", 0)), time.time(), list(_scalars(record))))
            now = time.monotonic()
            if now - self._tb_handed >= METRICS_FLUSH_SECONDS:
                self._hand_to_tensorboard(now)

    def _hand_to_tensorboard(self, now: float) -> None:
        """The pending events to TensorBoard's writer thread, one event per step."""
        pending, self._tb_pending, self._tb_handed = self._tb_pending, [], now
        try:
            for step, wall_time, scalars in pending:
                _add_scalars(self._tb, scalars, step, wall_time)
        except Exception as exc:  # noqa: BLE001 - TensorBoard is a convenience, never fatal
            self._warn_once(f"could not write TensorBoard scalars to {self.tensorboard_dir}: {exc}")

    def flush(self) -> None:
        """Every record written so far to disk (metrics.jsonl and TensorBoard's events)."""
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._warn_once(f"could not append to {self.path}: {exc}")
            self._flushed = time.monotonic()
        if self._tb is not None:
            self._hand_to_tensorboard(time.monotonic())
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()  # writes what is still buffered
            except OSError as exc:
                explained = write_failure(exc, self.path, "the metrics", key="workspace_dir")
                self._warn_once(str(explained) if explained is not None else f"could not append to {self.path}: {exc}")
            self._file = None
        if self._tb is not None:
            self._hand_to_tensorboard(time.monotonic())
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s (further metrics errors are not reported)", message)


def _add_scalars(writer: Any, scalars: Iterable[tuple[str, float]], step: int, wall_time: float) -> None:
    """All of a step's scalars as one TensorBoard event: what SummaryWriter.add_scalar writes one
    event per value for (a protobuf, a timestamp and a queue entry each), which made TensorBoard the
    largest fixed cost of a small model's step. TensorBoard reads several values per event as it
    reads one. Falls back to add_scalar where the writer lacks the file-writer accessor."""
    pairs = list(scalars)
    file_writer = getattr(writer, "_get_file_writer", None)
    if file_writer is None:
        for tag, value in pairs:
            writer.add_scalar(tag, value, step, walltime=wall_time)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value)) for tag, value in pairs])
    file_writer().add_summary(summary, step, wall_time)


def _prepare_for_append(path: Path, resume_step: int | None) -> None:
    """Cut a torn last line, and when resuming drop records after resume_step (atomic rewrite)."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data
    if keep and not keep.endswith(b"\n"):
        keep = keep[: keep.rfind(b"\n") + 1]
    if resume_step is not None:
        lines = []
        for raw in keep.splitlines(keepends=True):
            try:
                step = json.loads(raw).get("step")
            except (ValueError, AttributeError):
                continue
            if isinstance(step, int) and step <= resume_step:
                lines.append(raw)
        keep = b"".join(lines)
    if keep != data:
        write_bytes_atomic(path, keep)


def _open_summary_writer(directory: Path, resume_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        log.warning("TensorBoard logging is off: %s", exc)
        return None
    kwargs: dict[str, Any] = {"flush_secs": TENSORBOARD_FLUSH_SECONDS}
    if resume_step is not None:
        kwargs["purge_step"] = resume_step + 1
    return SummaryWriter(log_dir=str(directory), **kwargs)
