"""Where a denoiser's weights live while it trains: their storage, checkpointing and offloading.

The order matters; each step needs the one before it (docs/memory.md has the pieces):

1. load_denoiser: a quantized transformer.weight_dtype loads through the adapter's quantized load
   (frozen, on the CPU, through the quantization cache in cache_dir); with layer offloading a
   model loads on the CPU, because the offloader decides what goes to the device; otherwise it
   loads straight onto the device. Gradient checkpointing is on for ON and CPU_OFFLOADED.
2. The LoRA (Trainer._add_lora): peft wraps the quantized layers; its weights train in float32.
3. place_denoiser: BlockOffloader.attach keeps the offloaded blocks' frozen weights in CPU memory
   and moves everything else, the LoRA included, to the device; or the whole model moves.
4. accelerator.prepare must not move an offloaded model (device_placement), and DDP must not
   broadcast frozen tensors (ignore_frozen_for_ddp).

During the loop, activation_offload wraps the forward pass (CPU_OFFLOADED) and Offloaders counts
the bytes the offloaders moved per optimizer step. A CUDA out-of-memory error becomes one line
with the estimator's advice (out_of_memory_error).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from core.errors import ConfigError, UserError
from core.memory.quantize import is_quantized_dtype
from core.models.dtypes import compute_dtype

log = logging.getLogger(__name__)

__all__ = [
    "Offloaders",
    "activation_offload",
    "estimated_peak_bytes",
    "ignore_frozen_for_ddp",
    "is_out_of_memory",
    "load_denoiser",
    "out_of_memory_error",
    "place_denoiser",
]


def activation_offload(gradient_checkpointing: str) -> Any:
    """The context for the forward pass: saved activations wait in CPU memory for CPU_OFFLOADED
    (core.memory.activation_offload, imported here so that importing the trainer stays light)."""
    from core.memory.activation_offload import activation_offload as context

    return context(gradient_checkpointing)


def load_denoiser(adapter: Any, name: str, config: dict[str, Any], accelerator: Any) -> Any:
    """One denoiser, frozen, in transformer.weight_dtype, with checkpointing and frame-local
    attention as configured; on the CPU when quantized or offloaded (place_denoiser moves it)."""
    part = config["transformer"]
    weight_dtype, checkpoint = part["weight_dtype"], part["model_path"] or None
    device = accelerator.device
    if is_quantized_dtype(weight_dtype):
        work_device = device if device.type == "cuda" else None
        cache_dir = Path(config["cache_dir"]).expanduser()
        # The main process quantizes and writes the cache first; the others then read the file.
        with accelerator.main_process_first():
            transformer = adapter.load_quantized_transformer(name, weight_dtype, cache_dir=cache_dir,
                                                             work_device=work_device, checkpoint=checkpoint)
    else:
        from accelerate.utils import DistributedType

        # FSDP (distributed_type FSDP): each block's shard goes to the device when it is wrapped.
        sharded = accelerator.distributed_type == DistributedType.FSDP
        home = "cpu" if config["layer_offload_fraction"] > 0 or sharded else device
        transformer = adapter.load_transformer(name, home, compute_dtype(weight_dtype), checkpoint)
    if not config["video_config"]["use_temporal_attention"]:
        adapter.set_frame_local_attention(transformer)
    if config["gradient_checkpointing"] in ("ON", "CPU_OFFLOADED"):
        transformer.enable_gradient_checkpointing()
    return transformer


def place_denoiser(transformer: Any, adapter: Any, config: dict[str, Any], device: Any) -> Any:
    """Move a denoiser (with its LoRA) to the device: all of it, or all but the frozen weights of
    layer_offload_fraction of its blocks, which the returned BlockOffloader streams (else None).
    The blocks are those of every stack the adapter names (block_stacks), counted together."""
    fraction = config["layer_offload_fraction"]
    if fraction > 0:
        from core.memory.offload import BlockOffloader

        return BlockOffloader(adapter.block_stacks(transformer), fraction, device).attach(transformer)
    if any(not _on(tensor, device) for tensor in (*transformer.parameters(), *transformer.buffers())):
        transformer.to(device)  # loaded on the CPU to be quantized there
    return None


def _on(tensor: Any, device: Any) -> bool:
    return tensor.device.type == device.type and device.index in (None, tensor.device.index)


def ignore_frozen_for_ddp(model: Any) -> None:
    """Keep DistributedDataParallel away from the frozen tensors: every process loaded the same
    weights, so broadcasting them at the start is only time (a 14B model's weights), offloaded
    blocks live in CPU memory, which DDP cannot hold in a GPU model, and quantized tensor
    subclasses need not survive a broadcast. Only the LoRA is DDP's: averaged gradients, one start."""
    import torch

    names = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


class Offloaders:
    """The block offloaders of the trained denoisers (None where a denoiser is not offloaded)."""

    def __init__(self, offloaders: list[Any]) -> None:
        self.offloaders = [o for o in offloaders if o is not None]

    def take_bytes_moved(self) -> int:
        """Bytes copied to the device since the last call, over every denoiser (metrics' offload_bytes_per_step)."""
        return sum(o.take_bytes_moved() for o in self.offloaders)

    def detach(self) -> None:
        for offloader in self.offloaders:
            offloader.detach()


# --------------------------------------------------------------------------------------------------
# The estimate beside the run, and out-of-memory advice


def estimated_peak_bytes(config: dict[str, Any], folder: Path) -> int | None:
    """The estimator's peak GPU bytes for this run (run_info.json's estimated_peak_bytes), or None
    when it cannot size this model."""
    try:
        from core.memory.estimate import estimate_memory
        from core.memory.known_models import configs_from_folder

        return int(estimate_memory(config, configs_from_folder(folder)).peak_bytes)
    except Exception as e:  # noqa: BLE001 - no estimate is no reason to stop a run
        log.info("no memory estimate for %s: %s", folder, e)
        return None


def is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


GENERAL_ADVICE = ("lower resolution, frames or batch_size, or store and move less: transformer.weight_dtype FLOAT_8, "
                  "gradient_checkpointing ON, layer_offload_fraction 0.5 ('python main.py estimate --fit GB' proposes settings)")


def out_of_memory_error(config: dict[str, Any], folder: Path | None) -> UserError:
    """The one line for a CUDA out-of-memory error: the estimate for the GPU and the least slow
    settings that the estimator says fit (core.memory.fit.propose_fit)."""
    from core.memory.estimate import GIB, detect_vram, estimate_memory
    from core.memory.fit import propose_fit
    from core.memory.known_models import configs_from_folder

    try:
        detected = detect_vram()
        if detected is None:
            raise ValueError("no CUDA device to fit")
        vram, name = detected
        if folder is None:
            raise ValueError("no model folder")
        configs = configs_from_folder(folder)
        needed = estimate_memory(config, configs).higher_phase_bytes
        proposal = propose_fit(config, vram, configs)
    except Exception as e:  # noqa: BLE001 - the estimator cannot answer for this model: general advice
        log.info("no memory estimate for the out-of-memory advice: %s", e)
        return UserError(f"out of GPU memory; {GENERAL_ADVICE}")
    head = f"out of GPU memory on {name} ({vram / GIB:.1f} GiB; these settings are estimated to need {needed / GIB:.1f} GiB)"
    if proposal is None:
        return UserError(f"{head}; no weight storage, checkpointing or offloading fits by the estimate: "
                         "lower resolution, frames or batch_size")
    changes, fitted = proposal
    if not changes:
        return UserError(f"{head}; by the estimate they fit, so something else may hold GPU memory: close other "
                         f"programs using the GPU, or {GENERAL_ADVICE}")
    sets = " ".join(f"--set {key}={value}" for key, value in changes.items())
    keys = tuple(changes)
    return ConfigError(f"{head}; try {sets} (estimated {fitted.higher_phase_bytes / GIB:.1f} GiB)", key=keys[0], also=keys[1:])
