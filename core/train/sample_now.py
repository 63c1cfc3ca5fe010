"""A sample between runs: the base model with the workspace's newest trained weights, one video.

The window's sample window calls make_sample() on a worker thread when no run is under way (during a
run it queues the same SampleRequest to the running trainer instead, TrainerCommands.request_sample).
The newest weights are, by the time they were written, the newest of:

- the run's result, when it is a LoRA file (or one per expert) at output_path: read with the family's
  diffusers pipeline class (its `lora_state_dict`, which also converts ComfyUI's key names) and put
  into the denoiser with diffusers' `load_lora_adapter`, the path `load_lora_weights` takes;
- the newest complete backup under workspace_dir/backups: its trained weights, put into the training
  method's own parts (LoRA layers, the fine-tuned weights, the embedding's rows) as resume does.

A fine-tuned model's folder and an embedding file are results too, but this reads them from their
backups only (a run's last backup holds the same weights unless steps followed it); with neither a
backup nor a LoRA file, the base model alone is sampled, and the result says so. An image-to-video
model starts from the first frame of the datasets' first clip that decodes. The video is written
atomically into workspace_dir/samples by the same SampleMaker a run uses, named after the weights'
step ('step-000200-w1-a-cat.mp4'). The workspace lock is held meanwhile, so a run cannot start on
the same workspace (and GPU memory) half-way through.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.models.base import SampleRequest

from .backup import INFO_FILE, TRAINED_FILE, BackupFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Weights:
    """Where the trained weights of a sample come from: a backup folder, LoRA files, or none."""

    kind: str  # "backup", "lora" or "base"
    step: int  # the training step they were saved at (0 for the base model)
    paths: dict[str, Path] = field(default_factory=dict)  # denoiser name -> its LoRA file; "backup" -> the folder

    def describe(self) -> str:
        if self.kind == "backup":
            return f"the backup of step {self.step} ({self.paths['backup']})"
        if self.kind == "lora":
            return f"the LoRA of step {self.step} ({', '.join(str(p) for p in self.paths.values())})"
        return "the base model (no backup or LoRA file in this workspace yet)"


@dataclass(frozen=True)
class SampleResult:
    path: Path
    weights: Weights


def first_clip_frame(config: dict[str, Any]) -> Any:
    """The first frame of the datasets' first clip (or image) that decodes, as (H, W, 3) uint8: what an
    image-to-video model's sample between runs starts from (a run takes its first training clip's)."""
    from core.data.decode import decode_frames
    from core.data.discovery import discover_datasets
    from core.data.media import UnusableMedia
    from core.data.probe import probe

    items, _ = discover_datasets(config)
    for item in items:
        try:
            return decode_frames(item.path, [0.0], probe(item.path))[0]
        except UnusableMedia as exc:
            log.info("no first frame from %s: %s", item.path, exc)
    raise UserError("this image-to-video model samples from a first frame, and no clip or image in the datasets "
                    "decodes; add one to a dataset folder (Data tab)")


def _lora_step(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return int((handle.metadata() or {}).get("video_trainer.steps", 0) or 0)


def newest_weights(config: dict[str, Any], adapter: Any) -> Weights:
    """The newest of the workspace's newest backup and the LoRA result files (by the time written)."""
    from .experts import chosen_denoisers
    from .methods import parts_for

    backup = BackupFolder(Path(config["workspace_dir"]).expanduser()).newest()
    found = Weights("base", 0)
    written = float("-inf")
    if backup is not None:
        found = Weights("backup", backup.step, {"backup": backup.path})
        written = (backup.path / INFO_FILE).stat().st_mtime  # written last
    if config["training_method"] == "LORA":
        names = [d.name for d in chosen_denoisers(config, adapter)]
        paths = parts_for("LORA").result_paths(config, adapter, names)
        if all(p.is_file() for p in paths) and min(p.stat().st_mtime for p in paths) > written:
            found = Weights("lora", _lora_step(paths[0]), dict(zip(names, paths)))
    return found


def _load_lora_file(transformer: Any, path: Path, adapter: Any) -> None:
    """A LoRA result file into a denoiser, as the family's pipeline's load_lora_weights loads it."""
    import diffusers

    from core.models.registry import FAMILIES

    pipeline = getattr(diffusers, FAMILIES[adapter.family].pipelines[0])
    try:
        state, metadata = pipeline.lora_state_dict(str(path), return_lora_metadata=True)
        transformer.load_lora_adapter(state, prefix="transformer", metadata=metadata, adapter_name="default")
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"the LoRA file {path} does not fit this base model ({first}); check base_model, or sample "
                        "with the settings it was trained with") from None


def _load_backup(parts: Any, folder: Path) -> None:
    from .fsdp_backup import is_sharded, read_trained
    from .resume import read_tensors

    tensors = read_trained(folder) if is_sharded(folder) else read_tensors(folder / TRAINED_FILE)
    params = parts.named_trainable()
    if set(params) != set(tensors):
        raise UserError(f"the backup {folder} holds other trained weights than the current settings make "
                        "(training_method, lora.rank or lora.target_layers differ); sample with the settings it was made with")
    from .resume import load_trained

    load_trained(params, tensors, folder)


def _denoisers(config: dict[str, Any], adapter: Any, weights: Weights, device: Any) -> tuple[dict[str, Any], Any, list[Any]]:
    """(denoiser name -> module, the method's parts or None, the block offloaders) with the weights in."""
    from accelerate import PartialState

    from .experts import chosen_denoisers
    from .methods import parts_for
    from .placement import load_denoiser, place_denoiser

    state = PartialState()  # one process: what load_denoiser asks of an accelerator (device, main first)
    chosen = chosen_denoisers(config, adapter)
    parts = None
    if weights.kind == "backup":
        parts = parts_for(config["training_method"])(config, adapter, device)
        parts.load(chosen, lambda name: load_denoiser(adapter, name, config, state))
        modules = parts.transformers
    else:
        modules = [load_denoiser(adapter, d.name, config, state) for d in chosen]
    offloaders = [place_denoiser(module, adapter, config, device) for module in modules]
    if weights.kind == "backup":
        _load_backup(parts, weights.paths["backup"])
    elif weights.kind == "lora":
        for denoiser, module in zip(chosen, modules):
            _load_lora_file(module, weights.paths[denoiser.name], adapter)
    for module in modules:
        module.eval()
    return {d.name: m for d, m in zip(chosen, modules)}, parts, [o for o in offloaders if o is not None]


def make_sample(config: dict[str, Any], request: SampleRequest, on_log: Callable[[int, str], None] | None = None, *,
                release_memory: bool = True) -> SampleResult:
    """One sample of `request` from the base model with the workspace's newest weights (newest_weights),
    written into workspace_dir/samples; a UserError with the reason when it cannot be made.
    release_memory: collect the garbage and empty torch's CUDA cache at the end; a caller on a worker
    thread of the window passes False and does it on the GUI thread (release_sample_memory), where the
    window collects garbage (gui/collector.py)."""
    import torch

    from core.models.dtypes import compute_dtype
    from core.models.registry import adapter_for

    from .samples import SampleMaker
    from .workspace_lock import hold_workspace

    if not str(request.prompt).strip():
        raise UserError("the sample needs a prompt: write what the video should show")
    workspace = Path(str(config.get("workspace_dir") or "")).expanduser()
    if not str(config.get("workspace_dir") or "").strip():
        raise UserError("workspace_dir is empty: set the workspace folder (General tab) the samples go into")
    adapter = adapter_for(config)
    if adapter.image_conditioned and request.image is None:
        request = replace(request, image=first_clip_frame(config))
    lock = hold_workspace(config, on_log)
    offloaders: list[Any] = []
    try:
        weights = newest_weights(config, adapter)
        log.info("sampling %r with %s", request.prompt, weights.describe())
        if on_log is not None:
            on_log(logging.INFO, f"Sampling with {weights.describe()}")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        denoisers, parts, offloaders = _denoisers(config, adapter, weights, device)
        keeps = parts is not None and parts.keeps_text_encoder
        maker = SampleMaker(adapter, config, workspace, device, compute_dtype(config["train_dtype"]),
                            unload_encoders_after=not keeps)
        written = maker.make(weights.step, denoisers, asked=[request])
        if not written:
            reason = maker.failures[0] if maker.failures else "no file was written"
            raise UserError(f"the sample was not made: {reason}")
        return SampleResult(written[0], weights)
    finally:
        for offloader in offloaders:
            offloader.detach()
        lock.release()
        if release_memory:
            release_sample_memory()


def release_sample_memory() -> None:
    """The sample's models are garbage once make_sample returns: collect them and give their GPU
    memory back (torch's cache would keep it from a run started next)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
