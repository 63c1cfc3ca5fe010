"""The training loop: cached batches in, a LoRA file out, with accelerate doing precision and devices.

The trainer never branches on the model family: everything family-specific is behind the adapter.
It talks to its client (CLI or window) only through TrainerCallbacks and polls TrainerCommands
between steps.

Several processes (`accelerate launch --multi_gpu --num_processes N main.py train ...`) train with
DDP: every process builds the same sampler over the GLOBAL batch size (batch_size x N) and takes its
share of each batch (core.data.buckets.shard_batch); noise and noise levels are drawn per sample,
seeded by (seed, step, position in the global batch), so N processes with batch_size B see the
same samples and the same noise as one process with batch_size N x B. Only the main process fills
the caches (the others wait, then read them), calls the client's callbacks and writes files
(metrics, run_info.json, the LoRA). See docs/training.md, "Several GPUs".

Where the weights live (quantized storage, layer and activation offloading, the estimate beside the
run, out-of-memory advice) is placement.py's; see docs/memory.md, "In a training run".
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from core.data.buckets import (
    BucketBatchSampler,
    ShardedBatchSampler,
    shard_positions,
    total_batches,
)
from core.data.cache import ContentHasher
from core.data.dataset import CachedSampleDataset, make_loader
from core.data.plan import plan_data
from core.data.precompute import fill_caches
from core.errors import ConfigError, UserError
from core.models.dtypes import compute_dtype
from core.models.registry import adapter_for

from .draws import sample_first_frame_fixed, sample_noise
from .events import TrainerCallbacks, TrainerCommands
from .experts import chosen_denoisers, denoiser_objective, route
from .objective import (
    condition_first_frame,
    flow_matching_loss,
    flow_target,
    noisy_inputs,
)
from .optim import build_optimizer, build_scheduler
from .placement import (
    Offloaders,
    activation_offload,
    estimated_peak_bytes,
    ignore_frozen_for_ddp,
    is_out_of_memory,
    load_denoiser,
    out_of_memory_error,
    place_denoiser,
)
from .support import announcements, refusals

log = logging.getLogger(__name__)

MAX_BAD_STEPS = 5  # non-finite losses in a row before the run stops
# How long a process waits at a collective (DDP) before giving up. The other processes wait at a
# barrier while the main process fills the caches, which can take hours on a large dataset; the
# default (10 to 30 minutes) would end the run there. A process that fails does not leave the others
# waiting: the launcher (torch elastic) ends them all; one that hangs is noticed late.
PROCESS_GROUP_TIMEOUT = timedelta(hours=12)


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


class _ModelView:
    """The model as adapter.predict sees it under DDP: calls go through the wrapper (whose forward
    prepares the gradient all-reduce), attribute reads (config, dtype, ...) go to the model inside,
    which the wrapper does not expose."""

    def __init__(self, wrapper: Any, model: Any) -> None:
        self._wrapper, self._model = wrapper, model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _cache_package_checks() -> None:
    """accelerate (1.x) asks importlib.metadata whether lomo_optim is installed twice in every
    optimizer step, about 1.7 ms a step: more than the rest of its bookkeeping on a small model.
    Installed packages do not change during a run, so the answer is kept after the first ask."""
    import accelerate.accelerator
    import accelerate.optimizer

    for module in (accelerate.optimizer, accelerate.accelerator):
        check = getattr(module, "is_lomo_available", None)
        if check is not None and not hasattr(check, "cache_info"):
            module.is_lomo_available = functools.lru_cache(maxsize=None)(check)


def _release_accelerate_state() -> None:
    """Forget this run's precision and accumulation settings, which accelerate keeps process-wide
    (AcceleratorState and GradientState are singletons): without this, a second run in the same
    process (the window's next Start) with another train_dtype fails in Accelerator(). The process
    group (PartialState) stays: a launched multi-process job still needs it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


class _Routes:
    """The trained denoisers, and which one (with its narrowed objective) an optimizer step uses."""

    def __init__(self, denoisers: list[Any], wrappers: list[Any], models: list[Any], config: dict[str, Any], *, several_in_model: bool) -> None:
        self.denoisers, self.wrappers, self.models = denoisers, wrappers, models
        # What adapter.predict calls: under DDP the wrapper, with attribute reads going to the model.
        self.views = [w if m is w else _ModelView(w, m) for w, m in zip(wrappers, models)]
        self.objectives = [denoiser_objective(config["objective"], d) for d in denoisers]
        self.objective, self.seed = config["objective"], config["seed"]
        self.several_in_model = several_in_model
        self._active: int | None = None

    def pick(self, optimizer_step: int) -> tuple[Any, Any, dict[str, Any], dict[str, str]]:
        """(wrapper, view, objective, extra metrics fields) of the denoiser training this step."""
        index = route(self.denoisers, self.objective, self.seed, optimizer_step)
        extra = {"expert": self.denoisers[index].name} if self.several_in_model else {}
        if index != self._active:
            # The resting expert keeps eval mode. Only on a change: train() walks every module,
            # about as long as the whole step costs on a tiny model.
            for i, model in enumerate(self.models):
                model.train(i == index)
            self._active = index
        return self.wrappers[index], self.views[index], self.objectives[index], extra


class Trainer:
    def __init__(self, config: dict[str, Any], callbacks: TrainerCallbacks | None = None, commands: TrainerCommands | None = None):
        self.config = config
        self.callbacks = callbacks or TrainerCallbacks()
        self.commands = commands or TrainerCommands()

    # -- preparation ---------------------------------------------------------------------------
    def _check(self, adapter: Any) -> None:
        import torch

        problems = refusals(self.config, adapter.family)
        if self.config["train_dtype"] == "FLOAT_16" and not torch.cuda.is_available():
            # accelerate would silently compute in float32 on a CPU.
            problems.append(ConfigError("train_dtype FLOAT_16 needs a CUDA GPU; on a CPU use FLOAT_32 or BFLOAT_16", key="train_dtype"))
        if self.config["objective"]["image_to_video_share"] > 0 and not adapter.image_to_video:
            problems.append(ConfigError(
                f"objective.image_to_video_share: {adapter.family} cannot learn image-to-video from a clip's first "
                "frame (Wan 2.2 TI2V-5B can); set it to 0", key="objective.image_to_video_share"))
        if self.config["transformer"]["model_path"] and len(adapter.transformer_names()) > 1:
            problems.append(ConfigError(
                "transformer.model_path replaces the transformer of a one-transformer model; Wan 2.2 A14B has two "
                "experts: point base_model at a diffusers folder holding both, or leave it empty", key="transformer.model_path"))
        if problems:
            raise problems[0]
        for note in announcements(self.config):
            self.callbacks.on_log(logging.WARNING, note)
        ratios = self.config["video_config"]
        wrong = [key for key, actual in (("spatial_compression_ratio", adapter.spatial_ratio),
                                         ("temporal_compression_ratio", adapter.temporal_ratio))
                 if ratios[key] != actual]
        if wrong:
            keys = tuple(f"video_config.{key}" for key in wrong)
            raise ConfigError(
                f"video_config.spatial_compression_ratio/temporal_compression_ratio are "
                f"{ratios['spatial_compression_ratio']}/{ratios['temporal_compression_ratio']} but the model's VAE "
                f"compresses {adapter.spatial_ratio}x/{adapter.temporal_ratio}x; set them to "
                f"{adapter.spatial_ratio} and {adapter.temporal_ratio}",
                key=keys[0], also=keys[1:],
            )

    def _plan(self, adapter: Any) -> Any:
        cache_dir = Path(self.config["cache_dir"]).expanduser()
        return plan_data(self.config, adapter, ContentHasher(cache_dir), progress=lambda m: self.callbacks.on_log(logging.INFO, m))

    def _prepare_data(self, adapter: Any, accelerator: Any) -> Any:
        """The data plan with every cache entry filled; None if a stop was requested meanwhile.

        Only the main process fills the caches; the others wait at a barrier, then plan (cheap: no
        decoding) and leave out the files the main process could not decode, so every process ends
        with the same plan and reads the same entries.
        """
        config = self.config
        cache_dir = Path(config["cache_dir"]).expanduser()
        several = accelerator.num_processes > 1
        outcome: dict[str, Any] = {"failed": [], "stopped": False, "error": None}
        plan, error = None, None
        if accelerator.is_main_process:
            try:
                plan = self._plan(adapter)
                report = fill_caches(
                    plan, adapter, cache_dir, device=str(accelerator.device), workers=max(1, config["dataloader_threads"]),
                    should_stop=lambda: self.commands.stop_requested,
                )
                self.callbacks.on_log(logging.INFO, report.summary())
                for issue in report.failed:
                    self.callbacks.on_log(logging.WARNING, f"left out: {issue}")
                outcome.update(failed=list(report.failed), stopped=self.commands.stop_requested)
            except Exception as e:
                if not several:
                    raise
                error = e  # tell the waiting processes before raising, so they do not wait forever
                outcome["error"] = str(e) or type(e).__name__
        if several:
            from accelerate.utils import broadcast_object_list

            accelerator.wait_for_everyone()
            box = [outcome]
            broadcast_object_list(box, from_process=0)
            outcome = box[0]
            if error is not None:
                raise error
            if outcome["error"] is not None:
                raise UserError(f"the main process failed while preparing the data: {outcome['error']}")
            if not accelerator.is_main_process:
                plan = self._plan(adapter)
                plan.drop({issue.path for issue in outcome["failed"]}, outcome["failed"])
        if outcome["stopped"]:
            return None
        if not plan.train:
            raise UserError("no clips are left to train on after caching (see the warnings above)")
        return plan

    def _stop_requested(self, accelerator: Any) -> bool:
        """Whether any process was asked to stop: all of them stop after the same step (a process
        leaving alone would leave the others waiting in the gradient all-reduce)."""
        if accelerator.num_processes == 1:
            return self.commands.stop_requested
        import torch

        flag = torch.tensor([1.0 if self.commands.stop_requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def _add_lora(self, transformer: Any, adapter: Any) -> None:
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

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            return self._run()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            log.debug("out of GPU memory", exc_info=True)
            error = out_of_memory_error(self.config, getattr(self, "_model_folder", None))
        finally:
            _release_accelerate_state()
        # Raised outside the handler, so the error's traceback (holding the step's tensors) is gone.
        raise error

    def _run(self) -> TrainResult:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        from .run_info import write_run_info
        from .telemetry import MetricsWriter, step_record

        config = self.config
        adapter = adapter_for(config)
        self._model_folder = adapter.folder  # for the out-of-memory advice
        _cache_package_checks()
        accelerator = Accelerator(
            mixed_precision=_precision(config["train_dtype"]),
            gradient_accumulation_steps=config["gradient_accumulation_steps"],
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)],
        )
        if not accelerator.is_main_process:
            # One voice towards the client: progress bars, logs and the window follow the main process.
            self.callbacks = TrainerCallbacks()
        self._check(adapter)
        world_size, rank = accelerator.num_processes, accelerator.process_index
        set_seed(config["seed"])
        plan = self._prepare_data(adapter, accelerator)
        if plan is None:
            return TrainResult(0, 0, True)

        denoisers = chosen_denoisers(config, adapter)
        transformers = [self._load_denoiser(adapter, denoiser.name, accelerator) for denoiser in denoisers]
        for transformer in transformers:
            self._add_lora(transformer, adapter)  # after quantizing: peft wraps the quantized layers
        # Layer offloading keeps some blocks' frozen weights in CPU memory; the rest goes to the device.
        placed = [place_denoiser(transformer, adapter, config, accelerator.device) for transformer in transformers]
        offloaders = Offloaders(placed)
        lora_params = [[p for p in transformer.parameters() if p.requires_grad] for transformer in transformers]
        self._trainable = [p for params in lora_params for p in params]  # clipping walks only these
        part_lr = config["transformer"]["learning_rate"]
        lr = config["learning_rate"] if part_lr is None else part_lr  # 0.0 means frozen, not "unset"
        # One optimizer over every expert's LoRA: a step trains one expert, and the others, without
        # gradients, are left exactly as they are (see core/train/experts.py).
        optimizer = build_optimizer(config["optimizer"], [{"params": params, "lr": lr} for params in lora_params], lr)

        records = plan.sampler_records()
        # batch_size is per process (per GPU): every process draws the same global batches (world_size
        # times the per-process image and video batch sizes) and takes its share of each.
        global_batch = config["batch_size"] * world_size
        batches = total_batches(config, records, world_size)
        accumulation = config["gradient_accumulation_steps"]
        total_steps = batches // accumulation
        scheduler = build_scheduler(config["lr_scheduler"], optimizer, config["warmup_steps"], total_steps)
        sampler = BucketBatchSampler(
            records, config["batch_size"], config["video_config"]["video_batch_size_multiplier"], config["seed"], steps=batches,
            world_size=world_size,
        )
        loader = make_loader(
            CachedSampleDataset(plan.cached_samples(), Path(config["cache_dir"]).expanduser()),
            ShardedBatchSampler(sampler, rank, world_size),
            num_workers=config["dataloader_threads"],
            pin_memory=torch.cuda.is_available(),
            seed=config["seed"],
            frame_dropout_probability=config["video_config"]["frame_dropout_probability"],
            frame_channels=adapter.latent_channels,
        )
        # The scheduler is not prepared: accelerate's wrapper steps it once per process at every
        # optimizer step (made for loaders that shrink with the process count), but total_steps
        # already counts global steps; the loop steps it itself, once per optimizer step.
        if world_size > 1:
            for transformer in transformers:
                ignore_frozen_for_ddp(transformer)
        # An offloaded model must stay where the offloader put it (prepare would move all of it).
        placement = [False if offloader is not None else None for offloader in placed]
        *transformers, optimizer = accelerator.prepare(*transformers, optimizer, device_placement=[*placement, None])
        models = [accelerator.unwrap_model(t) for t in transformers]

        workspace = Path(config["workspace_dir"]).expanduser()
        metrics = MetricsWriter(workspace, enabled=accelerator.is_main_process)
        if accelerator.is_main_process:
            write_run_info(workspace, config, dict(zip((d.name for d in denoisers), models)),
                           {"total_steps": total_steps, "samples": len(plan.train), "family": adapter.family,
                            "world_size": world_size, "global_batch_size": global_batch,
                            "denoisers": [vars(d) for d in denoisers],
                            "estimated_peak_bytes": estimated_peak_bytes(config, adapter.folder)})
        self._batches_per_pass = max(1, len(sampler.pass_batches(0)))
        routes = _Routes(denoisers, transformers, models, config, several_in_model=len(adapter.transformer_names()) > 1)
        result = self._loop(accelerator, adapter, routes, optimizer, scheduler, loader, metrics, step_record, total_steps, offloaders)
        metrics.close()
        offloaders.detach()

        if accelerator.is_main_process and result.steps > 0:
            result.output_paths.extend(self._save(adapter, denoisers, models, result.steps))
        accelerator.wait_for_everyone()
        self.callbacks.on_done(result.output_paths)
        return result

    def _load_denoiser(self, adapter: Any, name: str, accelerator: Any) -> Any:
        return load_denoiser(adapter, name, self.config, accelerator)

    def _save(self, adapter: Any, denoisers: list[Any], models: list[Any], steps: int) -> list[Path]:
        """One LoRA file, or one per trained expert of a two-expert model (_high_noise, _low_noise)."""
        from core.export.lora import expert_output_paths, save_lora

        config, lora = self.config, self.config["lora"]
        output = Path(config["output_path"]).expanduser()
        names = [d.name for d in denoisers]
        paths = expert_output_paths(output, names) if len(adapter.transformer_names()) > 1 else {names[0]: output}
        saved = []
        for name, model in zip(names, models):
            metadata = {"video_trainer.steps": str(steps), "video_trainer.base_model": str(config["base_model"])}
            if len(paths) > 1 or name != "transformer":
                metadata["video_trainer.component"] = name
            saved.append(save_lora(paths[name], model, rank=lora["rank"], alpha=lora["alpha"],
                                   output_format=config["output_format"], metadata=metadata))
        return saved

    def _loop(self, accelerator, adapter, routes, optimizer, scheduler, loader, metrics, step_record, total_steps, offloaders) -> TrainResult:
        import torch

        config = self.config
        objective, weight = config["objective"], config["video_config"]["temporal_consistency_weight"]
        i2v_share = objective["image_to_video_share"]
        from .telemetry import SmoothedLoss

        smoother = SmoothedLoss()
        result = TrainResult(0, total_steps, False)
        bad_in_a_row, window_loss, window_count = 0, 0.0, 0
        started = last = time.perf_counter()
        samples_since = 0
        rank, world_size = accelerator.process_index, accelerator.num_processes
        accumulation = config["gradient_accumulation_steps"]
        # One process has nothing to gather; accelerate's gather still walks its helpers each call.
        gather = accelerator.gather if world_size > 1 else (lambda tensor: tensor)
        for batch in loader:
            # An image-to-video model's entries carry the first frame's latents after the video's.
            latents, condition = adapter.split_latents(batch["latents"].to(accelerator.device))
            # One denoiser per optimizer step (two-expert models), the same in every process.
            transformer, view, step_objective, expert = routes.pick(int(batch["step"]) // accumulation)
            # Noise and noise levels per sample, seeded by (seed, batch step, position in the global
            # batch): the same in every run with any number of processes, and a resumed run
            # continues the same sequence.
            positions = shard_positions(latents.shape[0], rank, world_size)
            sigmas, noise = sample_noise(latents.shape, positions, config["seed"], int(batch["step"]), step_objective)
            sigmas = sigmas.to(accelerator.device)
            noise = noise.to(accelerator.device, latents.dtype)
            noisy, fixed = noisy_inputs(latents, noise, sigmas), None
            if i2v_share > 0:
                fixed = sample_first_frame_fixed(positions, config["seed"], int(batch["step"]), i2v_share).to(accelerator.device)
                noisy = condition_first_frame(noisy, latents, fixed)
            with accelerator.accumulate(transformer):
                with accelerator.autocast(), activation_offload(config["gradient_checkpointing"]):
                    prediction = adapter.predict(view, noisy, sigmas, batch, first_frame_fixed=fixed, condition=condition)
                loss, parts = flow_matching_loss(prediction.float(), flow_target(latents, noise).float(), sigmas, objective, weight,
                                                 first_frame_fixed=fixed)
                # Every process decides on the same losses, so all skip a step or none does.
                losses = gather(loss.detach())
                if not torch.isfinite(losses).all():
                    bad_in_a_row += 1
                    result.skipped_steps += 1
                    self.callbacks.on_log(logging.WARNING, f"loss is {losses.mean().item()} at step {result.steps + 1}; step skipped")
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
                    accelerator.clip_grad_norm_(self._trainable, config["max_grad_norm"])
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window_loss += losses.mean().item()
            window_count += 1
            samples_since += latents.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            result.steps += 1
            now = time.perf_counter()
            record = step_record(
                result.steps, int(batch["step"]) // self._batches_per_pass, window_loss / window_count,
                scheduler.get_last_lr()[0], smoother=smoother, timestep=float(gather(sigmas).mean()) * 1000,
                samples_per_s=samples_since / max(now - last, 1e-9), seconds_per_step=now - last,
                device=accelerator.device, loss_temporal=parts.get("temporal"),
                offload_bytes_per_step=offloaders.take_bytes_moved(), **expert,
            )
            result.final_loss = record["loss"]
            metrics.write(record)
            self.callbacks.on_metrics(record)
            eta = (now - started) / result.steps * (total_steps - result.steps)
            self.callbacks.on_progress(result.steps, total_steps, record["epoch"], eta)
            window_loss, window_count, samples_since, last = 0.0, 0, 0, now
            if self._stop_requested(accelerator):
                result.stopped_early = True
                break
            if result.steps >= total_steps:
                break
        if result.final_loss is not None and not math.isfinite(result.final_loss):
            result.final_loss = None
        return result
