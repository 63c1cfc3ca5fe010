"""The step loop, and what happens between optimizer steps: metrics, EMA, validation, samples,
backups, stop requests.

Every process runs the loop; only the main process validates, samples, writes backups and talks to
the client (the others get no-op callbacks and no writers). All processes stop after the same step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from core.data.buckets import shard_positions
from core.errors import UserError

from .draws import sample_first_frame_fixed, sample_noise
from .events import TrainerCallbacks, TrainerCommands
from .memory_readings import other_processes_memory
from .objective import condition_first_frame, training_loss
from .placement import activation_offload

MAX_BAD_STEPS = 5  # non-finite losses in a row before the run stops


def zero_grad_of(optimizer: Any, accelerator: Any) -> Callable[[], None]:
    """What accelerate's AcceleratedOptimizer.zero_grad(set_to_none=True) does: zero (drop) the
    gradients once an optimizer step is due, not between accumulated micro-batches. The wrapper
    inspects the wrapped optimizer's signature on every call (0.1 ms, a step of the tiny model's
    1 %); here it is asked once. Anything else is called as it is."""
    import inspect

    inner = getattr(optimizer, "optimizer", None)
    if inner is None or "set_to_none" not in inspect.signature(inner.zero_grad).parameters:
        return lambda: optimizer.zero_grad(set_to_none=True)

    def zero_grad() -> None:
        if accelerator.sync_gradients:
            inner.zero_grad(set_to_none=True)

    return zero_grad


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    stopped_early: bool
    output_paths: list[Any]
    final_loss: float | None = None
    skipped_steps: int = 0
    resumed_from: int = 0  # the step the run continued from (0: from the start)


@dataclass
class RunParts:
    """Everything the loop uses, built by the Trainer."""

    config: dict[str, Any]
    accelerator: Any
    adapter: Any
    parts: Any  # methods.TrainedParts
    routes: Any  # experts.Routes
    optimizer: Any
    scheduler: Any
    loader: Any
    metrics: Any
    offloaders: Any
    callbacks: TrainerCallbacks
    commands: TrainerCommands
    total_steps: int
    batches_per_pass: int
    captions_of: Callable[[list[Any]], list[str]]
    smoother: Any
    fused: bool = False  # the optimizer steps inside backward (FusedBackward)
    ema: Any = None  # ema.TrainedAverage
    validator: Any = None  # validation.Validator
    plateau: Any = None  # validation.PlateauWatch
    samples: Any = None  # samples.SampleMaker (main process only; also without prompts, for asked samples)
    samples_requested: bool = False  # prompts are set: every process pauses while the main one samples
    backup: Callable[[int, int, int], Any] | None = None  # (step, batch step, epoch) -> path
    rng_to_restore: dict[str, Any] | None = None
    sharded: bool = False  # distributed.strategy FSDP across several processes


def _captions_with_dropout(captions_of: Callable[[list[Any]], list[str]], batch: dict[str, Any]) -> Callable[[list[Any]], list[str]]:
    """captions_of for a method that encodes captions live: the empty caption where the batch's
    sample dropped its own (caption_dropout), as the cached entries it replaces do."""
    dropped = batch.get("caption_dropped")
    if dropped is None or not bool(dropped.any()):
        return captions_of
    flags = [bool(d) for d in dropped.tolist()]
    return lambda ids: ["" if flag else caption for caption, flag in zip(captions_of(ids), flags)]


class Loop:
    def __init__(self, run: RunParts, result: TrainResult) -> None:
        self.run = run
        self.result = result

    def _requests(self, *asked: bool) -> list[bool]:
        """Flags raised in any process, the same in every process: all of them stop, sample and back
        up after the same step (a process going its own way would leave the others waiting in the
        gradient all-reduce). One all-reduce for all flags."""
        accelerator = self.run.accelerator
        if accelerator.num_processes == 1:
            return list(asked)
        import torch

        flags = torch.tensor([1.0 if w else 0.0 for w in asked], device=accelerator.device)
        return [bool(v > 0) for v in accelerator.reduce(flags, reduction="sum").tolist()]

    def run_steps(self) -> TrainResult:
        import torch

        from .resume import restore_rng_states
        from .telemetry import step_record

        r, result = self.run, self.result
        config, accelerator, adapter = r.config, r.accelerator, r.adapter
        weight = config["video_config"]["temporal_consistency_weight"]
        i2v_share = config["objective"]["image_to_video_share"]
        # The family's objective (noisy input, target, weight), built once: nothing per step.
        objective = adapter.objective(config["objective"])
        bad_in_a_row, window_loss, window_count = 0, 0.0, 0
        started = last = time.perf_counter()
        first_step = result.steps
        samples_since = 0
        rank, world_size = accelerator.process_index, accelerator.num_processes
        accumulation = config["gradient_accumulation_steps"]
        every = {name: config[name]["every_n_steps"] for name in ("backup", "validation", "sampling")}
        # One process has nothing to gather; accelerate's gather still walks its helpers each call.
        gather = accelerator.gather if world_size > 1 else (lambda tensor: tensor)
        zero_grad = zero_grad_of(r.optimizer, accelerator)
        batches = iter(r.loader)
        if r.rng_to_restore is not None:
            # After the iterator exists: creating it drew from the global generator in the
            # uninterrupted run as well, before the step the backup was made after.
            restore_rng_states(r.rng_to_restore)
        for batch in batches:
            # An image-to-video model's entries carry the first frame's latents after the video's.
            latents, condition = adapter.split_latents(batch["latents"].to(accelerator.device))
            # One denoiser per optimizer step (two-expert models), the same in every process.
            transformer, view, step_objective, expert = r.routes.pick(int(batch["step"]) // accumulation)
            captions_of = _captions_with_dropout(r.captions_of, batch)
            batch = r.parts.prepare_batch(batch, captions_of)
            if adapter.kept_text_encoders:  # what the cache does not hold, encoded now
                batch = {**batch, **adapter.encode_kept_text(captions_of(batch["sample_ids"]))}
            # Noise and noise levels per sample, seeded by (seed, batch step, position in the global
            # batch): the same in every run with any number of processes, and a resumed run
            # continues the same sequence.
            positions = shard_positions(latents.shape[0], rank, world_size)
            sigmas, noise = sample_noise(latents.shape, positions, config["seed"], int(batch["step"]), step_objective)
            sigmas = sigmas.to(accelerator.device)
            noise = noise.to(accelerator.device, latents.dtype)
            noisy, fixed = objective.noisy(latents, noise, sigmas), None
            if i2v_share > 0:
                fixed = sample_first_frame_fixed(positions, config["seed"], int(batch["step"]), i2v_share).to(accelerator.device)
                noisy = condition_first_frame(noisy, latents, fixed)
            accumulated = (transformer,) if r.parts.trains_denoisers() else ()
            with accelerator.accumulate(*accumulated):
                with accelerator.autocast(), activation_offload(config["gradient_checkpointing"]):
                    prediction = adapter.predict(view, noisy, sigmas, batch, first_frame_fixed=fixed, condition=condition)
                target = objective.target(latents, noise, sigmas) if objective.needs_target else None
                loss, parts = training_loss(prediction.float(), target, sigmas, objective, weight,
                                            first_frame_fixed=fixed, latents=latents, noisy=noisy,
                                            sample_weights=batch.get("loss_weights"))
                auxiliary = adapter.auxiliary_loss(view)  # the family's own term, already weighted
                if auxiliary is not None:
                    loss = loss + auxiliary.float()
                # Every process decides on the same losses, so all skip a step or none does.
                losses = gather(loss.detach())
                if not torch.isfinite(losses).all():
                    bad_in_a_row += 1
                    result.skipped_steps += 1
                    r.callbacks.on_log(logging.WARNING, f"loss is {losses.mean().item()} at step {result.steps + 1}; step skipped")
                    if not r.fused:
                        zero_grad()
                    if bad_in_a_row >= MAX_BAD_STEPS:
                        raise UserError(
                            f"the loss was not a number for {MAX_BAD_STEPS} steps in a row at step {result.steps}; "
                            "lower learning_rate, or train in BFLOAT_16 or FLOAT_32 instead of FLOAT_16"
                        )
                    continue
                bad_in_a_row = 0
                accelerator.backward(loss)  # with a fused backward, every weight is updated in here
                r.parts.reduce_gradients(accelerator)
                if not r.fused and accelerator.sync_gradients and config["max_grad_norm"] > 0:
                    accelerator.clip_grad_norm_(r.parts.trainable(), config["max_grad_norm"])
                r.optimizer.step()  # a fused backward only closes the step here: its weights moved in backward
                if accelerator.sync_gradients and (r.fused or not accelerator.optimizer_step_was_skipped):
                    r.scheduler.step()
                if not r.fused:
                    zero_grad()
            window_loss += losses.mean().item()
            window_count += 1
            samples_since += latents.shape[0] * world_size
            if not accelerator.sync_gradients:
                continue
            result.steps += 1
            step, batch_step = result.steps, int(batch["step"])
            epoch = batch_step // r.batches_per_pass
            if r.ema is not None:
                r.ema.update()
            now = time.perf_counter()
            # The other processes' memory beside the main one's (every process joins the gathering).
            others = other_processes_memory(accelerator) if world_size > 1 else {}
            record = step_record(
                step, epoch, window_loss / window_count,
                r.scheduler.get_last_lr()[0], smoother=r.smoother, timestep=float(gather(sigmas).mean()) * 1000,
                samples_per_s=samples_since / max(now - last, 1e-9), seconds_per_step=now - last,
                device=accelerator.device, loss_temporal=parts.get("temporal"),
                offload_bytes_per_step=r.offloaders.take_bytes_moved(), **expert, **others,
            )
            if r.validator is not None and every["validation"] and step % every["validation"] == 0:
                record.update(self._validate(step, record.get("loss_smoothed")))
            # The smoothed loss, as the progress bar and the window show it (the raw one jumps with
            # each batch's noise level).
            result.final_loss = record["loss_smoothed"] if record.get("loss_smoothed") is not None else record["loss"]
            r.metrics.write(record)
            r.callbacks.on_metrics(record)
            eta = (now - started) / (step - first_step) * (r.total_steps - step)
            r.callbacks.on_progress(step, r.total_steps, epoch, eta)
            sample_due = every["sampling"] > 0 and step % every["sampling"] == 0
            sample_asked = r.commands.take_sample_request()
            if sample_asked and not r.samples_requested:
                r.callbacks.on_log(logging.WARNING, "no sample made: sampling.prompts is empty; add a prompt (sampling tab)")
            asked = r.commands.take_asked_samples()  # the window's sample window: its own parameters
            if asked and r.sharded:
                r.callbacks.on_log(logging.WARNING, "no sample made: a sharded (FSDP) model cannot sample in the main "
                                   "process alone; sample from the saved result")
                asked = []
            stop, sample, any_asked, backup_asked = self._requests(
                r.commands.stop_requested, sample_due or sample_asked, bool(asked), r.commands.take_backup_request())
            if (sample and r.samples_requested) or any_asked:
                self._sample(step, configured=sample and r.samples_requested, asked=asked)
            due = bool(every["backup"]) and step % every["backup"] == 0
            if r.backup is not None and (backup_asked or due or (stop and step < r.total_steps)):
                # Every record up to the backup on disk before the backup is: a crash right after it
                # is in place loses none that resume keeps (a resume drops the records after its step).
                r.metrics.flush()
                r.backup(step, batch_step, epoch)
            window_loss, window_count, samples_since, last = 0.0, 0, 0, time.perf_counter()
            if stop:
                result.stopped_early = True
                break
            if step >= r.total_steps:
                break
        if result.final_loss is not None and not math.isfinite(result.final_loss):
            result.final_loss = None
        return result

    # -- between steps -------------------------------------------------------------------------
    def _validate(self, step: int, train_loss_smoothed: float | None) -> dict[str, float]:
        r = self.run
        if not r.accelerator.is_main_process:
            return {}
        values = r.validator.evaluate(r.routes.model_for_sigma)
        if r.plateau is not None and "val_loss" in values:
            warning = r.plateau.update(step, values["val_loss"], train_loss_smoothed)
            if warning:
                r.callbacks.on_log(logging.WARNING, warning)
        return values

    def _sample(self, step: int, *, configured: bool, asked: list[Any]) -> None:
        """The configured prompts' samples (configured) and then those asked with their own
        parameters (asked: SampleRequests), on the main process; the others wait."""
        r = self.run
        if r.samples is not None:
            with r.ema.applied() if r.ema is not None else nullcontext():
                if configured:
                    r.samples.make(step, r.routes.sampling_denoisers())
                if asked:
                    r.samples.make(step, r.routes.sampling_denoisers(), asked=asked)
            r.offloaders.take_bytes_moved()  # what sampling streamed is not the next step's traffic
        r.accelerator.wait_for_everyone()
