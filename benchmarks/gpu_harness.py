"""One case of benchmarks/gpu_acceptance.py: a model folder, random weights, the engine's training step, measured.

No weights are downloaded or read. The model folder holds only configs: at real size a folder made
here from core/memory/known_models.py (model_index.json, transformer/config.json, vae/config.json
and, where the adapter reads one, scheduler/scheduler_config.json); for --cpu-smoke a tiny model's
folder (core.models.tiny.build_tiny_model), whose weights are not read either. The adapter
(core.models.registry.adapter_for) reads these configs for its sizes, objective and timesteps.

The transformer is built from transformer/config.json on the device with random weights (the
class's own initialisation, in float32, then stored in the dtypes from_pretrained gives:
bfloat16, float32 for the class's _keep_in_fp32_modules). The adapter's load_transformer and
load_quantized_transformer are replaced by that build (quantized with core.memory.quantize.quantize_model
and the family's quantize_filter, as the adapter's own single-file path does), and everything else is the
engine's: core.train.placement.load_denoiser (frame-local attention, checkpointing), LoraParts.load
(peft's add_adapter, float32 LoRA), place_denoiser (BlockOffloader), build_optimizer,
adapter.objective, sample_sigmas, adapter.predict inside autocast and activation_offload,
training_loss, gradient clipping and the optimizer step, as core/train/loop.py runs them.

One difference: with layer offloading, placement asks for the transformer on the CPU; it is built
on the device anyway (making 5-14 B random weights on a CPU takes minutes) and the offloader moves
the offloaded blocks' weights to pinned CPU memory when it attaches, as it does with a model loaded there.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

log = logging.getLogger("gpu_acceptance")

PIPELINES = {"wan22_ti2v_5b": "WanPipeline", "wan22_a14b": "WanPipeline", "wan21": "WanPipeline",
             "wan22_a14b_i2v": "WanImageToVideoPipeline", "cogvideox": "CogVideoXPipeline",
             "cogvideox_i2v": "CogVideoXImageToVideoPipeline", "hunyuan_video": "HunyuanVideoPipeline"}
VAES = {"Wan": "AutoencoderKLWan", "Cog": "AutoencoderKLCogVideoX", "Hun": "AutoencoderKLHunyuanVideo"}
# WanPipeline's boundary_ratio of the A14B releases (the adapter's docstring: 0.875 T2V, 0.9 I2V).
BOUNDARIES = {"wan22_a14b": 0.875, "wan22_a14b_i2v": 0.9}


class Skip(Exception):
    """A case that cannot run here (no config in the repo, ...): the reason goes in the table."""


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def config_only_folder(hub_id: str, family: str, out: Path) -> Path:
    """A diffusers folder with only the configs the adapter and the estimator read, from known_models.py."""
    from core.memory.known_models import KNOWN_MODELS

    known = KNOWN_MODELS.get(hub_id)
    if known is None or family not in PIPELINES:
        raise Skip(f"no config of {hub_id} ({family}) in core/memory/known_models.py")
    transformer = {"_class_name": "WanTransformer3DModel", **known.transformers[0]}
    cls = str(transformer["_class_name"])
    vae_class = VAES[cls[:3]]
    index: dict[str, Any] = {"_class_name": PIPELINES[family], "transformer": ["diffusers", cls], "vae": ["diffusers", vae_class]}
    vae = {"_class_name": vae_class, **known.vae}
    z, spatial, temporal = known.vae["z_dim"], known.vae["scale_factor_spatial"], known.vae["scale_factor_temporal"]
    if vae_class == "AutoencoderKLCogVideoX":  # its ratios come from block_out_channels' defaults (8x) and these
        vae.update(latent_channels=z, temporal_compression_ratio=temporal)
        from core.models.tiny.cogvideox import (
            _scheduler,  # the releases' scheduler_config.json
        )

        index["scheduler"] = ["diffusers", "CogVideoXDDIMScheduler"]
        _write(out / "scheduler" / "scheduler_config.json", dict(_scheduler(1.0).config))
    elif vae_class == "AutoencoderKLHunyuanVideo":
        vae.update(latent_channels=z, spatial_compression_ratio=spatial, temporal_compression_ratio=temporal)
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        _write(out / "scheduler" / "scheduler_config.json", {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000})
    if known.expand_timesteps:
        index["expand_timesteps"] = True
    if len(known.transformers) > 1:
        index["transformer_2"] = ["diffusers", cls]
        index["boundary_ratio"] = BOUNDARIES[family]
        _write(out / "transformer_2" / "config.json", {"_class_name": cls, **known.transformers[1]})
    _write(out / "model_index.json", index)
    _write(out / "transformer" / "config.json", transformer)
    _write(out / "vae" / "config.json", vae)
    return out


def random_transformer(folder: Path, name: str, device: Any, dtype: Any) -> Any:
    """The denoiser that folder/name/config.json describes, random weights made on device."""
    import diffusers
    import torch

    config = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
    cls = getattr(diffusers, str(config.get("_class_name") or "WanTransformer3DModel"))
    torch.manual_seed(0)
    with torch.device(device):
        model = cls.from_config(config)
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if any(k in pname.split(".") for k in keep) else dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the float32 build
    return model.requires_grad_(False).eval()


def install_random_weights(adapter: Any, device: Any) -> None:
    """Replace the adapter's two loaders (the only parts that read weights) by random_transformer."""
    from core.memory.quantize import quantize_model
    from core.models.dtypes import compute_dtype

    def load_transformer(name: str, _where: Any, dtype: Any, checkpoint: str | None = None) -> Any:
        return random_transformer(adapter.folder, name, device, dtype)

    def load_quantized_transformer(name: str, weight_dtype: str, *, cache_dir: Any = None, work_device: Any = None,
                                   checkpoint: str | None = None) -> Any:
        model = random_transformer(adapter.folder, name, device, compute_dtype(weight_dtype))
        quantize_model(model, weight_dtype, include=adapter.quantize_filter(name, weight_dtype), work_device=work_device)
        return model

    adapter.load_transformer = load_transformer
    adapter.load_quantized_transformer = load_quantized_transformer


def inputs(adapter: Any, config: dict[str, Any], transformer: Any, device: Any) -> dict[str, Any]:
    """Random cached latents and text conditions of the real shapes for one video batch."""
    import torch

    batch = max(1, round(config["batch_size"] * config["video_config"]["video_batch_size_multiplier"]))
    frames = adapter.frame_rule.round_down(config["frames"]) or 1
    if adapter.fixed_size is not None:
        height, width = (v // adapter.spatial_ratio for v in adapter.fixed_size)
    else:
        cells = (config["resolution"] // adapter.size_divisor) * (adapter.size_divisor // adapter.spatial_ratio)
        height = width = max(cells, adapter.size_divisor // adapter.spatial_ratio)
    latent_frames, channels = adapter.latent_frames(frames), adapter.latent_channels
    if adapter.image_conditioned:  # the cache entry holds the image condition too (split_latents)
        if adapter.family.startswith("cogvideox"):
            latent_frames += 1
        else:
            channels *= 2
    g = torch.Generator().manual_seed(1)
    cached = torch.randn(batch, channels, latent_frames, height, width, generator=g)
    tc = transformer.config
    text_dim = int(tc.get("text_dim") or tc.get("text_embed_dim"))
    length = int(adapter.max_text_length)
    conditions: dict[str, Any] = {}
    for key in adapter.condition_layout():
        if key.endswith("mask"):
            conditions[key] = torch.ones(batch, length, dtype=torch.bool)
        elif key.startswith("pooled"):
            conditions[key] = torch.randn(batch, int(tc.get("pooled_projection_dim")), generator=g).to(torch.bfloat16)
        else:
            conditions[key] = torch.randn(batch, length, text_dim, generator=g).to(torch.bfloat16)
    latents, condition = adapter.split_latents(cached.to(device))
    return {"latents": latents, "condition": condition, "conditions": {k: v.to(device) for k, v in conditions.items()},
            "frames": frames, "latent_shape": list(latents.shape), "text_tokens": length}


def run_case(config: dict[str, Any], device: Any, *, steps: int, warmup: int, deadline: float) -> dict[str, Any]:
    """Load, place and train `warmup + steps` steps of the case's first denoiser; measurements.
    Stops measuring early (at least one step) when the next step would pass `deadline` (perf_counter)."""
    import torch

    from core.models.dtypes import compute_dtype
    from accelerate.utils import DistributedType

    from core.models.registry import adapter_for
    from core.train.methods.lora import LoraParts
    from core.train.objective import sample_sigmas, training_loss
    from core.train.optim import build_optimizer
    from core.train.placement import activation_offload, load_denoiser, place_denoiser

    cuda = device.type == "cuda"
    started = time.perf_counter()
    adapter = adapter_for(config, download=False)
    install_random_weights(adapter, device)
    # One process, nothing sharded: what load_denoiser asks of an accelerator.
    accelerator = SimpleNamespace(device=device, main_process_first=contextlib.nullcontext, distributed_type=DistributedType.NO)
    parts = LoraParts(config, adapter, device)
    denoiser = adapter.denoisers()[0]  # one denoiser: an A14B case trains its high-noise expert
    parts.load([denoiser], lambda name: load_denoiser(adapter, name, config, accelerator))
    transformer = parts.transformers[0]
    offloader = place_denoiser(transformer, adapter, config, device)
    if offloader is not None:
        offloader.time_copies = True  # take_copy_seconds: the achieved host-to-device bandwidth
    transformer.train()
    optimizer = build_optimizer(config["optimizer"], parts.param_groups(), config["learning_rate"], config.get("optimizer_settings"))
    objective = adapter.objective(config["objective"])
    data = inputs(adapter, config, transformer, device)
    latents, condition, batch = data["latents"], data["condition"], data["conditions"]
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - started
    mixed = config["train_dtype"] != "FLOAT_32"
    autocast_dtype = compute_dtype(config["train_dtype"])
    generator = torch.Generator().manual_seed(2)
    times: list[float] = []
    moved: list[int] = []
    copy_s: list[float] = []
    activation_bytes: list[int] = []
    losses: list[float] = []
    allocated_before = 0
    for step in range(warmup + steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                allocated_before = torch.cuda.memory_allocated()
            if offloader is not None:
                offloader.take_bytes_moved()
                offloader.take_copy_seconds()
        measuring = step >= warmup
        if measuring and len(times) >= 1 and time.perf_counter() + statistics.median(times) > deadline:
            break
        began = time.perf_counter()
        sigmas = sample_sigmas(latents.shape[0], config["objective"], generator).to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        noisy = objective.noisy(latents, noise, sigmas)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=mixed), \
                activation_offload(config["gradient_checkpointing"]) as offload:
            prediction = adapter.predict(transformer, noisy, sigmas, batch, condition=condition)
        target = objective.target(latents, noise, sigmas) if objective.needs_target else None
        loss, _ = training_loss(prediction.float(), target, sigmas, objective,
                                config["video_config"]["temporal_consistency_weight"], latents=latents, noisy=noisy)
        loss.backward()
        if config["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(parts.trainable(), config["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        losses.append(float(loss.detach()))
        if not measuring:
            continue
        times.append(time.perf_counter() - began)
        activation_bytes.append(int(getattr(offload, "offloaded_bytes", 0) or 0))
        if offloader is not None:
            moved.append(offloader.take_bytes_moved())
            copy_s.append(offloader.take_copy_seconds() or 0.0)
    result: dict[str, Any] = {
        "build_seconds": build_s, "measured_steps": len(times), "seconds_per_step": statistics.median(times),
        "step_seconds": times, "losses": losses, "latent_shape": data["latent_shape"], "frames_trained": data["frames"],
        "text_tokens": data["text_tokens"], "denoiser": denoiser.name,
        "offload_bytes_per_step": int(statistics.median(moved)) if moved else 0,
        "offload_copy_seconds_per_step": statistics.median(copy_s) if copy_s else None,
        "activation_offload_bytes_per_step": int(statistics.median(activation_bytes)) if activation_bytes else 0,
        "trainable_parameters": sum(p.numel() for p in parts.trainable()),
        "transformer_class": type(transformer).__name__,
    }
    if moved and sum(copy_s) > 0:
        result["h2d_bytes_per_second"] = sum(moved) / sum(copy_s)
    if cuda:
        result.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(), peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                      allocated_before_steps_bytes=allocated_before)
    if offloader is not None:
        offloader.detach()
    del parts, transformer, optimizer, offloader, data, latents, condition, batch
    release(device)
    return result


def release(device: Any) -> None:
    """Free what a case left (its model, pinned masters, cached allocator blocks)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def link_bandwidth(device: Any, mib: int) -> dict[str, Any]:
    """Host-to-device bytes per second of one pinned buffer of `mib` MiB (best of 5 copies): the
    link's reference for the offloader's achieved bandwidth. On a CPU, a clone's (no link)."""
    import torch

    cuda = device.type == "cuda"
    host = torch.empty(mib * 2**20, dtype=torch.uint8, pin_memory=cuda)
    target = torch.empty_like(host, device=device)
    best = float("inf")
    for _ in range(5):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(host, non_blocking=True)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        else:
            began = time.perf_counter()
            target.copy_(host)
            seconds = time.perf_counter() - began
        best = min(best, seconds)
    del host, target
    release(device)
    return {"bytes": mib * 2**20, "seconds": best, "bytes_per_second": mib * 2**20 / best, "pinned": cuda}


def dry_run_case(config: dict[str, Any]) -> dict[str, Any]:
    """What a case would train, without weights: the adapter from the folder, the transformer and
    its LoRA on the meta device, the input shapes. Checks a real-size case's folder and settings on
    any machine (--dry-run)."""
    import torch

    from core.models.registry import adapter_for
    from core.train.methods.lora import LoraParts

    meta = torch.device("meta")
    adapter = adapter_for(config, download=False)
    install_random_weights(adapter, meta)
    parts = LoraParts(config, adapter, meta)
    denoiser = adapter.denoisers()[0]
    parts.load([denoiser], lambda name: adapter.load_transformer(name, meta, torch.bfloat16))
    transformer = parts.transformers[0]
    blocks = sum(len(stack) for stack in adapter.block_stacks(transformer))
    data = inputs(adapter, config, transformer, meta)
    adapter.objective(config["objective"])
    return {"denoiser": denoiser.name, "transformer_class": type(transformer).__name__, "blocks": blocks,
            "parameters_built": sum(p.numel() for p in transformer.parameters()),
            "trainable_parameters": sum(p.numel() for p in parts.trainable()),
            "latent_shape": data["latent_shape"], "frames_trained": data["frames"], "text_tokens": data["text_tokens"],
            "conditions": {k: list(v.shape) for k, v in data["conditions"].items()}}
