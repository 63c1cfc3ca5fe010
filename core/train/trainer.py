"""The trainer: builds a run (data, models, optimizer, backups) and hands it to the step loop.

The trainer never branches on the model family: everything family-specific is behind the adapter,
and everything method-specific (LORA, FINE_TUNE, EMBEDDING) behind core/train/methods. It talks to
its client (CLI or window) only through TrainerCallbacks and polls TrainerCommands between steps.

Several processes (`accelerate launch --multi_gpu --num_processes N main.py train ...`) train with
DDP: every process builds the same sampler over the GLOBAL batch size (batch_size x N) and takes its
share of each batch (core.data.buckets.shard_batch); noise and noise levels are drawn per sample,
seeded by (seed, step, position in the global batch), so N processes with batch_size B see the
same samples and the same noise as one process with batch_size N x B. Only the main process fills
the caches (the others wait, then read them), calls the client's callbacks and writes files
(metrics, run_info.json, backups, samples, the result). See docs/training.md, "Several GPUs".

A run with resume=True continues from the newest backup in workspace_dir/backups (core/train/
backup.py, resume.py); one without sets earlier backups and metrics aside, never deleting them.
Where the weights live (quantized storage, layer and activation offloading, the estimate beside the
run, out-of-memory advice) is placement.py's; see docs/memory.md, "In a training run".
"""

from __future__ import annotations

import functools
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from core.data.buckets import BucketBatchSampler, ShardedBatchSampler, total_batches
from core.data.dataset import CachedSampleDataset, make_loader
from core.models.registry import adapter_for, family_name

from .data_prep import prepare_data
from .events import TrainerCallbacks, TrainerCommands
from .experts import Routes, chosen_denoisers
from .loop import Loop, RunParts, TrainResult
from .methods import parts_for
from .output_guard import check_outputs, check_paths_set, save_result
from .placement import (
    Offloaders,
    estimated_peak_bytes,
    ignore_frozen_for_ddp,
    is_out_of_memory,
    load_denoiser,
    out_of_memory_error,
    place_denoiser,
)
from .run_backups import (
    backup_after_the_run,
    backup_to_resume,
    backup_writer,
    restore,
    set_earlier_runs_aside,
)
from .support import start_refusals
from .workspace_lock import hold_workspace

log = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainResult"]

# How long a process waits at a collective (DDP) before giving up. The other processes wait at a
# barrier while the main process fills the caches, which can take hours on a large dataset; the
# default (10 to 30 minutes) would end the run there. A process that fails does not leave the others
# waiting: the launcher (torch elastic) ends them all; one that hangs is noticed late.
PROCESS_GROUP_TIMEOUT = timedelta(hours=12)


def _precision(train_dtype: str) -> str:
    return {"FLOAT_32": "no", "FLOAT_16": "fp16", "BFLOAT_16": "bf16"}[train_dtype]


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

    from .fsdp import leave_fsdp

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    leave_fsdp()


class Trainer:
    def __init__(self, config: dict[str, Any], callbacks: TrainerCallbacks | None = None,
                 commands: TrainerCommands | None = None, *, resume: bool = False):
        self.config = config
        self.callbacks = callbacks or TrainerCallbacks()
        self.commands = commands or TrainerCommands()
        self.resume = resume

    # -- preparation ---------------------------------------------------------------------------
    def _check(self, adapter: Any, world_size: int) -> None:
        import torch

        # The same list the window shows while the settings are edited (core/train/preflight.py).
        problems = start_refusals(self.config, adapter, world_size=world_size, cuda=torch.cuda.is_available())
        if problems:
            raise problems[0]
        distributed = self.config["distributed"]
        if distributed["strategy"] == "FSDP" and distributed["sharding"] == "HYBRID_SHARD":
            from .fsdp import launched_machines

            if launched_machines() != distributed["machines"]:
                from core.errors import ConfigError

                raise ConfigError(f"distributed.machines is {distributed['machines']} but this run was launched on "
                                  f"{launched_machines()} machine(s); set it to {launched_machines()}, or launch on "
                                  f"{distributed['machines']}", key="distributed.machines")
        planned = distributed["processes"]
        if planned and planned != world_size:
            from core.errors import ConfigError

            raise ConfigError(f"distributed.processes is {planned} but {world_size} process(es) were launched; launch "
                              f"{planned} (accelerate launch --num_processes {planned}), or set it to {world_size} or 0",
                              key="distributed.processes")
        if adapter.fixed_size is not None:
            height, width = adapter.fixed_size
            self.callbacks.on_log(logging.INFO, f"{family_name(adapter.family)} takes frames of {width}x{height} pixels only: "
                                  f"every clip is scaled and cropped to that size, and resolution is not used")

    def _load_denoiser(self, adapter: Any, name: str, accelerator: Any) -> Any:
        return load_denoiser(adapter, name, self.config, accelerator)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        lock = hold_workspace(self.config, self.callbacks.on_log)  # to the run's end; a second run is refused
        try:
            return self._run()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            log.debug("out of GPU memory", exc_info=True)
            error = out_of_memory_error(self.config, getattr(self, "_model_folder", None))
        finally:
            _release_accelerate_state()
            lock.release()
        # Raised outside the handler, so the error's traceback (holding the step's tensors) is gone.
        raise error

    def _run(self) -> TrainResult:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        from .backup import BackupFolder
        from .run_info import write_run_info
        from .telemetry import MetricsWriter, SmoothedLoss

        config = self.config
        adapter = adapter_for(config)
        self._model_folder = adapter.folder  # for the out-of-memory advice
        _cache_package_checks()
        from .fsdp import enter_fsdp, fsdp_plugin, hybrid_parallelism, remember_environment, fsdp_requested

        plugin = parallelism = None
        if fsdp_requested(config):
            remember_environment()
            plugin, parallelism = fsdp_plugin(config), hybrid_parallelism(config)
        accelerator = Accelerator(
            mixed_precision=_precision(config["train_dtype"]),
            gradient_accumulation_steps=config["gradient_accumulation_steps"],
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)],
            fsdp_plugin=plugin,
            # HYBRID_SHARD's device mesh: accelerate builds it for GPU jobs only (enter_fsdp on a CPU).
            parallelism_config=parallelism if torch.cuda.is_available() else None,
        )
        # FSDP needs several processes; one trains as it would without it.
        sharded = plugin is not None and enter_fsdp(accelerator, plugin, parallelism)
        if not accelerator.is_main_process:
            # One voice towards the client: progress bars, logs and the window follow the main process.
            self.callbacks = TrainerCallbacks()
        world_size, rank = accelerator.num_processes, accelerator.process_index
        check_paths_set(config)  # before _check: an empty output_path is said to be empty
        self._check(adapter, world_size)
        # Where the result goes, before any work: no overwriting what the app did not write, no
        # writing into the model or the data, a writable folder (core/train/output_guard.py).
        outputs = check_outputs(config, adapter, [d.name for d in chosen_denoisers(config, adapter)])
        workspace = Path(config["workspace_dir"]).expanduser()
        backups = BackupFolder(workspace, config["backup"]["keep"])
        backup = backup_to_resume(backups, self.callbacks.on_log) if self.resume else None
        if backup is not None:
            from .backup import check_resumable, settings_fingerprint
            from .run_info import app_version

            # Settings and version before the data is cached (which may take long); the data after.
            check_resumable(backup, app_version=app_version(), fingerprint=settings_fingerprint(config), data=None)
        set_seed(config["seed"])
        plan = prepare_data(config, adapter, accelerator, self.callbacks.on_log, lambda: self.commands.stop_requested)
        if plan is None:
            return TrainResult(0, 0, True, [])
        if adapter.kept_text_encoders:  # loaded for the run: they encode each batch's captions
            from core.models.conditions import load_text_encoders, text_weight_dtypes

            load_text_encoders(adapter, accelerator.device, text_weight_dtypes(adapter, config), adapter.kept_text_encoders)

        denoisers = chosen_denoisers(config, adapter)
        parts = parts_for(config["training_method"])(config, adapter, accelerator.device)
        parts.load(denoisers, lambda name: self._load_denoiser(adapter, name, accelerator))
        # Layer offloading keeps some blocks' frozen weights in CPU memory; the rest goes to the device.
        # FSDP loaded them on the CPU: each block's shard goes to the device as it is wrapped.
        placed = [None if sharded else place_denoiser(t, adapter, config, accelerator.device) for t in parts.transformers]
        offloaders = Offloaders(placed)
        optimizer, fused = self._optimizer(parts)

        records = plan.sampler_records()
        # batch_size is per process (per GPU): every process draws the same global batches (world_size
        # times the per-process image and video batch sizes) and takes its share of each.
        global_batch = config["batch_size"] * world_size
        batches = total_batches(config, records, world_size)
        accumulation = config["gradient_accumulation_steps"]
        total_steps = batches // accumulation
        from .optim import build_scheduler

        # A fused backward's learning rates live in its lead optimizer, which the scheduler steps.
        scheduled = optimizer.optimizer if fused else optimizer
        scheduler = build_scheduler(config["lr_scheduler"], scheduled, config["warmup_steps"], total_steps)

        from .resume import data_fingerprint

        data = data_fingerprint(plan, world_size, config["batch_size"], config["video_config"]["video_batch_size_multiplier"])
        if backup is not None:
            from .extend import check_length

            check_resumable(backup, app_version=app_version(), fingerprint=settings_fingerprint(config), data=data)
            check_length(backup, total_steps)
            self.callbacks.on_log(logging.INFO, f"continuing from the backup of step {backup.step} ({backup.path})")
        start_step = backup.step if backup is not None else 0
        sampler = BucketBatchSampler(
            records, config["batch_size"], config["video_config"]["video_batch_size_multiplier"], config["seed"], steps=batches,
            world_size=world_size, start_step=min(start_step * accumulation, batches),
        )
        loader = make_loader(
            CachedSampleDataset(plan.cached_samples(), Path(config["cache_dir"]).expanduser(), seed=config["seed"],
                                empty_text_key=plan.empty_text_key),
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
        transformers = list(parts.transformers)
        state_dtypes: dict[str, Any] = {}
        if sharded:
            from .fsdp import shard_denoiser

            transformers, optimizer, state_dtypes, self._fsdp_info = shard_denoiser(
                accelerator, adapter, transformers, optimizer, config["distributed"]["sharding"])
        elif parts.trains_denoisers():
            if world_size > 1:
                for transformer in transformers:
                    ignore_frozen_for_ddp(transformer)
            # An offloaded model must stay where the offloader put it (prepare would move all of it).
            placement = [False if offloader is not None else None for offloader in placed]
            if fused:
                transformers = accelerator.prepare(*transformers, device_placement=placement)
                transformers = list(transformers) if isinstance(transformers, (list, tuple)) else [transformers]
            else:
                *transformers, optimizer = accelerator.prepare(*transformers, optimizer, device_placement=[*placement, None])
        elif not fused:
            optimizer = accelerator.prepare(optimizer)
        models = [accelerator.unwrap_model(t) for t in transformers]
        parts.set_train_mode(True)

        ema = None
        if config["ema"]["enabled"]:
            from .ema import TrainedAverage

            ema = TrainedAverage(parts.named_trainable(), config["ema"]["decay"], config["ema"]["device"])
        smoother = SmoothedLoss()
        result = TrainResult(0, total_steps, False, [])
        run = RunParts(
            config=config, accelerator=accelerator, adapter=adapter, parts=parts,
            routes=Routes(denoisers, transformers, models, config, several_in_model=len(adapter.transformer_names()) > 1,
                           trained=parts.trains_denoisers()),
            optimizer=optimizer, scheduler=scheduler, loader=loader, metrics=None, offloaders=offloaders,
            callbacks=self.callbacks, commands=self.commands, total_steps=total_steps,
            batches_per_pass=max(1, len(sampler.pass_batches(0))), smoother=smoother, fused=fused, ema=ema,
            captions_of=lambda ids: [plan.train[int(i)].item.caption for i in ids],
        )
        run.sharded = sharded
        self._add_validation(run, plan)
        self._add_samples(run, plan, workspace)
        if backup is not None:
            from .extend import carry_schedule

            restore(run, backup, result)
            carried = carry_schedule(scheduler, backup, total_steps, config["lr_scheduler"])
            if carried is not None:
                self.callbacks.on_log(logging.INFO, carried)
        elif accelerator.is_main_process:
            set_earlier_runs_aside(workspace, backups, self.callbacks)
        # Backups are written when due, when asked for (Backup now) and when a run is stopped.
        # With several processes every one joins (its RNG states; FSDP: the shards), the main one writes.
        # An FSDP run's backups are shards even on one process: they continue on any number of them.
        run.backup = backup_writer(run, backups, config, data, result, together=world_size > 1,
                                   fsdp_model=models[0] if fsdp_requested(config) else None)
        run.metrics = MetricsWriter(workspace, enabled=accelerator.is_main_process, resume_step=start_step if backup else None)
        if accelerator.is_main_process:
            write_run_info(workspace, config, dict(zip((d.name for d in denoisers), models)),
                           {"total_steps": total_steps, "samples": len(plan.train), "family": adapter.family,
                            "world_size": world_size, "global_batch_size": global_batch,
                            "distributed": getattr(self, "_fsdp_info", None) if sharded else None,
                            "denoisers": [vars(d) for d in denoisers], "resumed_from_step": start_step,
                            "estimated_peak_bytes": estimated_peak_bytes(config, adapter.folder)})
        try:
            result = Loop(run, result).run_steps()
        finally:
            run.metrics.close()
            offloaders.detach()
            loader.close()  # the workers end with the steps, also on Stop, an exception or Ctrl+C

        if world_size > 1:
            # A failed final save keeps the weights in a backup that the main process writes alone.
            run.backup = backup_after_the_run(run, backups, data, result, sharded)
        if sharded and result.steps > 0:
            from .fsdp import gather_for_saving

            models = gather_for_saving(run, models, state_dtypes, trained_only=config["training_method"] == "LORA")
        if accelerator.is_main_process and result.steps > 0:
            # Finite weights only; a save that fails keeps them in a backup and says how to finish it.
            result.output_paths.extend(save_result(run, models, result, outputs, backups))
        accelerator.wait_for_everyone()
        self.callbacks.on_done(result.output_paths)
        return result

    # -- pieces of _run --------------------------------------------------------------------------
    def _optimizer(self, parts: Any) -> tuple[Any, bool]:
        """The optimizer over the method's parameter groups; with fused_backward, one that steps
        each weight inside the backward pass (core/train/fused_backward.py)."""
        from .optim import build_optimizer

        config = self.config
        groups = [g for g in parts.param_groups() if g["params"]]
        if config["training_method"] == "FINE_TUNE" and config["fused_backward"]:
            from .fused_backward import FusedBackward

            return FusedBackward.build(config["optimizer"], groups, config["learning_rate"], config["optimizer_settings"]), True
        return build_optimizer(config["optimizer"], groups, config["learning_rate"], config["optimizer_settings"]), False

    def _add_validation(self, run: RunParts, plan: Any) -> None:
        config = self.config
        if not config["validation"]["every_n_steps"] or not run.accelerator.is_main_process:
            return
        if not plan.validation:
            self.callbacks.on_log(logging.WARNING, "validation.every_n_steps is set but no clips are held out: set "
                                  "validation.holdout_fraction or validation.folder; no validation loss is computed")
            return
        from .validation import PlateauWatch, Validator

        run.validator = Validator(run.adapter, config, plan.validation, Path(config["cache_dir"]).expanduser(),
                                  run.accelerator.device, autocast=run.accelerator.autocast)
        run.plateau = PlateauWatch()

    def _add_samples(self, run: RunParts, plan: Any, workspace: Path) -> None:
        config = self.config
        run.samples_requested = bool(config["sampling"]["prompts"])
        if not run.accelerator.is_main_process:
            return
        # Built without prompts too: a sample asked from the window (with its own prompt) uses it.
        from core.models.dtypes import compute_dtype

        from .samples import SampleMaker

        image = first_frame(plan) if run.adapter.image_conditioned else None
        run.samples = SampleMaker(run.adapter, config, workspace, run.accelerator.device, compute_dtype(config["train_dtype"]),
                                  image=image, on_sample=self.callbacks.on_sample,
                                  unload_encoders_after=not run.parts.keeps_text_encoder, on_sampling=self.callbacks.on_sampling)


def first_frame(plan: Any) -> Any:
    """The first frame of the first training clip, as (H, W, 3) uint8: the image an image-to-video
    model's samples start from (the configured prompts describe what follows it)."""
    from core.data.decode import decode_frames

    sample = plan.train[0]
    return decode_frames(sample.item.path, [0.0], sample.info)[0]
