"""Step time and peak memory against layer_offload_fraction and weight_dtype, at the real Wan sizes.

For each model (randomly initialised from the built-in configs of core/memory/known_models.py, so
nothing is downloaded) and each weight_dtype, the transformer is built once, quantized
(core.memory.quantize), given a LoRA (rank 16 on the Wan adapter's default targets, float32) and
gradient checkpointing; then for each offload fraction a BlockOffloader is attached and --steps
training steps run (bfloat16 autocast, flow-matching MSE on random latents, AdamW on the LoRA).

On a CUDA GPU each cell reports: seconds per step (median of the steps after the first, which
warms up), torch.cuda.max_memory_allocated over those steps, the estimator's peak_bytes for the
same settings and the ratio measured / estimated, the transformer's weight bytes by dtype
(part_summary) and the offloader's bytes moved per step. The targets of issue 6: offload 0.5 costs
at most 15% step time against 0.0 and saves at least 40% of the blocks' weight memory; FLOAT_8
halves and NFLOAT_4 quarters the transformer's weights; the estimate is within 10% of the peak.

Without CUDA it runs the same code on the CPU (copies are clones) and reports what a CPU can:
weight bytes by dtype, the offloader's bytes moved per step and the CPU step time (not
comparable with a GPU's). Keep --tokens small there.

    python benchmarks/offload_gpu.py [--models wan21-1.3b,wan22-ti2v-5b] [--dtypes BFLOAT_16,FLOAT_8,NFLOAT_4]
        [--fractions 0,0.25,0.5,0.75] [--frames 17] [--resolution 480] [--steps 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from core.atomic import write_json_atomic
from core.config import resolve
from core.memory.estimate import estimate_memory
from core.memory.known_models import KNOWN_MODELS
from core.memory.offload import BlockOffloader
from core.memory.quantize import is_quantized_dtype, quantize_model
from core.train.run_info import part_summary

MODELS = {
    "wan21-1.3b": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "WAN_2_1"),
    "wan22-ti2v-5b": ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "WAN_2_2_TI2V_5B"),
}
LORA_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
KEEP_FP32 = ("scale_shift_table", "norm1", "norm2", "norm3", "time_embedder")  # diffusers' _keep_in_fp32_modules


def build_transformer(hub_id: str, weight_dtype: str) -> Any:
    """The real-size transformer with random weights (std 0.02), in the dtypes from_pretrained gives."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    config = KNOWN_MODELS[hub_id].transformers[0]
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(config)
    model = model.to_empty(device="cpu")
    storage = torch.float32 if weight_dtype == "FLOAT_32" else torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fp32 = any(part in name for part in KEEP_FP32)
            p.data = torch.empty(p.shape, dtype=torch.float32 if fp32 else storage).normal_(0, 0.02, generator=generator)
    # Buffers (the rotary tables) were computed by __init__ on the CPU: to_empty left them uninitialised.
    fresh = WanTransformer3DModel.from_config(dict(config, num_layers=1))
    for name, buffer in fresh.named_buffers():
        model.get_buffer(name).copy_(buffer)
    model.requires_grad_(False)
    if is_quantized_dtype(weight_dtype):
        quantize_model(model, weight_dtype, work_device="cuda" if torch.cuda.is_available() else None)
    return model


def add_lora(model: Any, rank: int) -> list[Any]:
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True))
    cast_training_params(model, dtype=torch.float32)
    model.enable_gradient_checkpointing()
    model.train()
    return [p for p in model.parameters() if p.requires_grad]


def settings(hub_id: str, model_type: str, weight_dtype: str, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    spatial = KNOWN_MODELS[hub_id].vae["scale_factor_spatial"]
    return resolve({
        "base_model": hub_id, "model_type": model_type, "transformer": {"weight_dtype": weight_dtype},
        "layer_offload_fraction": fraction, "gradient_checkpointing": "ON", "batch_size": 1, "frames": args.frames,
        "resolution": args.resolution, "lora": {"rank": args.rank, "alpha": float(args.rank)}, "train_dtype": "BFLOAT_16",
        "video_config": {"max_frames": args.frames, "spatial_compression_ratio": spatial, "video_batch_size_multiplier": 1.0},
    })


def run_steps(model: Any, params: list[Any], hub_id: str, device: torch.device, args: argparse.Namespace,
              offloader: BlockOffloader) -> dict[str, Any]:
    known = KNOWN_MODELS[hub_id]
    config = known.transformers[0]
    spatial, temporal = known.vae["scale_factor_spatial"], known.vae["scale_factor_temporal"]
    latent_frames = (args.frames - 1) // temporal + 1
    side = args.resolution // spatial
    if args.tokens:  # a CPU run: few tokens, the weights' traffic is what is measured
        latent_frames, side = 1, 2 * max(1, int(args.tokens ** 0.5))
    channels = config["in_channels"]
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, channels, latent_frames, side, side, generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    text = torch.randn(1, 512, config["text_dim"], generator=generator).to(device, torch.bfloat16)
    sigma = torch.full((1,), 0.5, device=device)
    if known.expand_timesteps:  # TI2V-5B: one timestep per latent token
        timestep = torch.full((1, latent_frames * (side // 2) ** 2), 500.0, device=device)
    else:
        timestep = sigma * 1000
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cuda = device.type == "cuda"
    times, moved = [], []
    for step in range(args.steps):
        if cuda and step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        offloader.take_bytes_moved()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            noisy = ((1 - sigma.view(-1, 1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1, 1) * noise).to(torch.bfloat16)
            prediction = model(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        loss = (prediction.float() - (noise - latents)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        moved.append(offloader.take_bytes_moved())
    result = {"seconds_per_step": statistics.median(times[1:]) if len(times) > 1 else times[0],
              "offload_bytes_per_step": moved[-1], "tokens": latent_frames * (side // 2) ** 2}
    if cuda:
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="wan21-1.3b,wan22-ti2v-5b")
    parser.add_argument("--dtypes", default="BFLOAT_16,FLOAT_8,NFLOAT_4")
    parser.add_argument("--fractions", default="0,0.25,0.5,0.75")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--resolution", type=int, default=480)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=0, help="CPU: run this few tokens per sample instead of --frames/--resolution")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tokens:
        args.tokens = 16
    print(f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}", flush=True)
    rows = []
    for key in args.models.split(","):
        hub_id, model_type = MODELS[key]
        for weight_dtype in args.dtypes.split(","):
            started = time.perf_counter()
            model = build_transformer(hub_id, weight_dtype)
            params = add_lora(model, args.rank)
            summary = part_summary(model)
            lora_bytes = sum(p.numel() * p.element_size() for p in params)
            built = time.perf_counter() - started
            offloader = None
            for fraction in (float(f) for f in args.fractions.split(",")):
                if offloader is not None:
                    offloader.detach()
                offloader = BlockOffloader(model.blocks, fraction, device).attach(model)
                measured = run_steps(model, params, hub_id, device, args, offloader)
                estimate = estimate_memory(settings(hub_id, model_type, weight_dtype, fraction, args))
                row = {"model": key, "weight_dtype": weight_dtype, "fraction": fraction, **measured,
                       "estimated_peak_bytes": estimate.peak_bytes, "weight_bytes": summary["weight_bytes"] - lora_bytes,
                       "bytes_by_dtype": summary["bytes_by_dtype"], "build_seconds": built}
                if "peak_bytes" in measured:
                    row["measured_over_estimated"] = measured["peak_bytes"] / estimate.peak_bytes
                rows.append(row)
                print(json.dumps(row), flush=True)
            offloader.detach()
            del model, params, offloader
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows)
    if args.json:
        write_json_atomic(args.json, rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    gib = 2**30
    print(f"\n{'model':14s} {'dtype':10s} {'offload':>7s} {'s/step':>8s} {'peak GiB':>9s} {'est GiB':>8s} {'meas/est':>8s} "
          f"{'weights GiB':>11s} {'moved GiB/step':>14s}")
    for r in rows:
        peak = f"{r['peak_bytes'] / gib:9.2f}" if "peak_bytes" in r else f"{'-':>9s}"
        ratio = f"{r['measured_over_estimated']:8.2f}" if "measured_over_estimated" in r else f"{'-':>8s}"
        print(f"{r['model']:14s} {r['weight_dtype']:10s} {r['fraction']:7.2f} {r['seconds_per_step']:8.2f} {peak} "
              f"{r['estimated_peak_bytes'] / gib:8.2f} {ratio} {r['weight_bytes'] / gib:11.2f} {r['offload_bytes_per_step'] / gib:14.2f}")


if __name__ == "__main__":
    main()
