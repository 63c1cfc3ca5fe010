"""The training loop: cached batches in, a LoRA file out, with accelerate doing precision and devices.

The trainer never branches on the model family: everything family-specific is behind the adapter.
It talks to its client (CLI or window) only through TrainerCallbacks and polls TrainerCommands
between steps.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.data.buckets import BucketBatchSampler, total_batches
from core.data.cache import ContentHasher
from core.data.dataset import CachedSampleDataset, make_loader
from core.data.plan import plan_data
from core.data.precompute import fill_caches
from core.errors import UserError
from core.models.dtypes import compute_dtype
from core.models.registry import adapter_for

from .events import TrainerCallbacks, TrainerCommands
from .objective import flow_matching_loss, flow_target, noisy_inputs, sample_sigmas
from .optim import build_optimizer, build_scheduler
from .support import announcements, refusals

log = logging.getLogger(__name__)

MAX_BAD_STEPS = 5  # non-finite losses in a row before the run stops


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    stopped_early: bool
    output_paths: list[Path] = field(default_factory=list)
    final_loss: float | None = None
    skipped_steps: int = 0


def _precision(train_dtype: str) -> str:
    return {"FLOAT_32": "no", "FLOAT_16": "fp16", "BFLOAT_16": "bf16"}[train_dtype]


class Trainer:
    def __init__(self, config: dict[str, Any], callbacks: TrainerCallbacks | None = None, commands: TrainerCommands | None = None):
        self.config = config
        self.callbacks = callbacks or TrainerCallbacks()
        self.commands = commands or TrainerCommands()

    # -- preparation ---------------------------------------------------------------------------
    def _check(self, adapter: Any) -> None:
        problems = refusals(self.config, adapter.family)
        if problems:
            raise problems[0]
        for note in announcements(self.config):
            self.callbacks.on_log(logging.WARNING, note)
        ratios = self.config["video_config"]
        if ratios["spatial_compression_ratio"] != adapter.spatial_ratio or ratios["temporal_compression_ratio"] != adapter.temporal_ratio:
            raise UserError(
                f"video_config.spatial_compression_ratio/temporal_compression_ratio are "
                f"{ratios['spatial_compression_ratio']}/{ratios['temporal_compression_ratio']} but the model's VAE "
                f"compresses {adapter.spatial_ratio}x/{adapter.temporal_ratio}x; set them to "
                f"{adapter.spatial_ratio} and {adapter.temporal_ratio}"
            )

    def _prepare_data(self, adapter: Any, device: str) -> Any:
        config = self.config
        cache_dir = Path(config["cache_dir"]).expanduser()
        plan = plan_data(config, adapter, ContentHasher(cache_dir), progress=lambda m: self.callbacks.on_log(logging.INFO, m))
        report = fill_caches(
            plan, adapter, cache_dir, device=device, workers=max(1, config["dataloader_threads"]),
            should_stop=lambda: self.commands.stop_requested,
        )
        self.callbacks.on_log(logging.INFO, report.summary())
        for issue in report.failed:
            self.callbacks.on_log(logging.WARNING, f"left out: {issue}")
        if not plan.train:
            raise UserError("no clips are left to train on after caching (see the warnings above)")
        return plan

    def _add_lora(self, transformer: Any, adapter: Any) -> list[Any]:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        lora = self.config["lora"]
        targets = lora["target_layers"] or adapter.default_lora_targets()
        try:
            transformer.add_adapter(
                LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                           target_modules=targets, init_lora_weights=True)
            )
        except ValueError as e:
            raise UserError(f"lora.target_layers {targets} match no layer of the model ({e}); leave it empty for the defaults") from None
        # LoRA weights train in float32 whatever the base's storage (fp32 master weights).
        cast_training_params(transformer, dtype=compute_dtype("FLOAT_32"))
        return [p for p in transformer.parameters() if p.requires_grad]

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from core.export.lora import save_lora

        from .run_info import write_run_info
        from .telemetry import MetricsWriter, step_record

        config = self.config
        adapter = adapter_for(config)
        self._check(adapter)
        accelerator = Accelerator(
            mixed_precision=_precision(config["train_dtype"]),
            gradient_accumulation_steps=config["gradient_accumulation_steps"],
            cpu=not torch.cuda.is_available(),
        )
        device = str(accelerator.device)
        set_seed(config["seed"])
        plan = self._prepare_data(adapter, device)
        if self.commands.stop_requested:
            return TrainResult(0, 0, True)

        transformer = adapter.load_transformer("transformer", accelerator.device, compute_dtype(config["transformer"]["weight_dtype"]))
        params = self._add_lora(transformer, adapter)
        if config["gradient_checkpointing"] == "ON":
            transformer.enable_gradient_checkpointing()
        transformer.train()
        lr = config["transformer"]["learning_rate"] or config["learning_rate"]
        optimizer = build_optimizer(config["optimizer"], [{"params": params, "lr": lr}], lr)

        records = plan.sampler_records()
        batches = total_batches(config, records)
        accumulation = config["gradient_accumulation_steps"]
        total_steps = batches // accumulation
        scheduler = build_scheduler(config["lr_scheduler"], optimizer, config["warmup_steps"], total_steps)
        sampler = BucketBatchSampler(
            records, config["batch_size"], config["video_config"]["video_batch_size_multiplier"], config["seed"], steps=batches
        )
        loader = make_loader(
            CachedSampleDataset(plan.cached_samples(), Path(config["cache_dir"]).expanduser()),
            sampler,
            num_workers=config["dataloader_threads"],
            pin_memory=torch.cuda.is_available(),
            seed=config["seed"],
            frame_dropout_probability=config["video_config"]["frame_dropout_probability"],
        )
        transformer, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)

        workspace = Path(config["workspace_dir"]).expanduser()
        metrics = MetricsWriter(workspace, enabled=accelerator.is_main_process)
        if accelerator.is_main_process:
            write_run_info(workspace, config, {"transformer": accelerator.unwrap_model(transformer)},
                           {"total_steps": total_steps, "samples": len(plan.train), "family": adapter.family})
        self._batches_per_pass = max(1, len(sampler.pass_batches(0)))
        result = self._loop(accelerator, adapter, transformer, optimizer, scheduler, loader, metrics, step_record, total_steps)
        metrics.close()

        if accelerator.is_main_process and result.steps > 0:
            lora = config["lora"]
            path = save_lora(
                Path(config["output_path"]).expanduser(), accelerator.unwrap_model(transformer), rank=lora["rank"],
                alpha=lora["alpha"], output_format=config["output_format"],
                metadata={"video_trainer.steps": str(result.steps), "video_trainer.base_model": str(config["base_model"])},
            )
            result.output_paths.append(path)
        accelerator.wait_for_everyone()
        self.callbacks.on_done(result.output_paths)
        return result

    def _loop(self, accelerator, adapter, transformer, optimizer, scheduler, loader, metrics, step_record, total_steps) -> TrainResult:
        import torch

        config = self.config
        objective, weight = config["objective"], config["video_config"]["temporal_consistency_weight"]
        from .telemetry import SmoothedLoss

        smoother = SmoothedLoss()
        result = TrainResult(0, total_steps, False)
        bad_in_a_row, window_loss, window_count = 0, 0.0, 0
        started = last = time.perf_counter()
        samples_since = 0
        for batch in loader:
            latents = batch["latents"].to(accelerator.device)
            # Noise and timesteps come from a generator seeded by (seed, batch step): the same batch
            # gets the same noise in every run, and a resumed run continues the same sequence.
            generator = torch.Generator(device="cpu").manual_seed(config["seed"] * 1_000_003 + int(batch["step"]))
            sigmas = sample_sigmas(latents.shape[0], objective, generator).to(accelerator.device)
            noise = torch.randn(latents.shape, generator=generator).to(accelerator.device, latents.dtype)
            with accelerator.accumulate(transformer):
                with accelerator.autocast():
                    prediction = adapter.predict(transformer, noisy_inputs(latents, noise, sigmas), sigmas, batch)
                loss, parts = flow_matching_loss(prediction.float(), flow_target(latents, noise).float(), sigmas, objective, weight)
                if not torch.isfinite(loss):
                    bad_in_a_row += 1
                    result.skipped_steps += 1
                    self.callbacks.on_log(logging.WARNING, f"loss is {loss.item()} at step {result.steps + 1}; step skipped")
                    optimizer.zero_grad(set_to_none=True)
                    if bad_in_a_row >= MAX_BAD_STEPS:
                        raise UserError(
                            f"the loss was not a number for {MAX_BAD_STEPS} steps in a row at step {result.steps}; "
                            "lower learning_rate, or train in BFLOAT_16 or FLOAT_32 instead of FLOAT_16"
                        )
                    continue
                bad_in_a_row = 0
                accelerator.backward(loss)
                if accelerator.sync_gradients and config["max_grad_norm"] > 0:
                    accelerator.clip_grad_norm_(transformer.parameters(), config["max_grad_norm"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window_loss += accelerator.gather(loss.detach()).mean().item()
            window_count += 1
            samples_since += latents.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            result.steps += 1
            now = time.perf_counter()
            record = step_record(
                result.steps, int(batch["step"]) // self._batches_per_pass, window_loss / window_count,
                scheduler.get_last_lr()[0], smoother=smoother, timestep=float(sigmas.mean()) * 1000,
                samples_per_s=samples_since / max(now - last, 1e-9), seconds_per_step=now - last,
                device=accelerator.device, loss_temporal=parts.get("temporal"),
            )
            result.final_loss = record["loss"]
            metrics.write(record)
            self.callbacks.on_metrics(record)
            eta = (now - started) / result.steps * (total_steps - result.steps)
            self.callbacks.on_progress(result.steps, total_steps, record["epoch"], eta)
            window_loss, window_count, samples_since, last = 0.0, 0, 0, now
            if self.commands.stop_requested:
                result.stopped_early = True
                break
            if result.steps >= total_steps:
                break
        if result.final_loss is not None and not math.isfinite(result.final_loss):
            result.final_loss = None
        return result
