"""'estimate': the peak GPU memory a training run will need, before it starts; --fit proposes settings."""

from __future__ import annotations

import argparse
import json
from typing import Any

from core.errors import UserError

from .settings_args import add_settings_arguments, settings_from_args

GIB = 2**30


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "estimate",
        help="estimate the GPU memory a training run needs",
        description="Predict the peak GPU memory of a training step from the model's real sizes (its config "
        "files, or built-in configs of the Wan models) and the settings, part by part, and say whether it "
        "fits the GPU given by --vram or the one detected. --fit GB proposes the least slow settings that fit.",
    )
    add_settings_arguments(cmd)
    cmd.add_argument("--vram", type=float, metavar="GB", help="GPU memory to compare with, in GiB (default: the detected GPU's)")
    cmd.add_argument("--fit", type=float, metavar="GB", help="propose settings that fit this many GiB")
    cmd.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    cmd.set_defaults(func=estimate_command)


def _gib(value: int) -> str:
    return f"{value / GIB:6.2f} GiB"


def _budget(value: float | None, flag: str) -> int | None:
    if value is None:
        return None
    if not value > 0:
        raise UserError(f"{flag} must be a positive number of GiB, not {value}")
    return int(value * GIB)


def estimate_command(args: argparse.Namespace) -> int:
    from core.memory.estimate import detect_vram, estimate_memory
    from core.memory.fit import propose_fit
    from core.memory.known_models import model_configs

    config = settings_from_args(args)
    configs = model_configs(config["base_model"])
    result = estimate_memory(config, configs)
    vram, gpu = _budget(args.vram, "--vram"), "--vram"
    if vram is None:
        detected = detect_vram()
        if detected is not None:
            vram, gpu = detected
    fit_budget = _budget(args.fit, "--fit")
    proposal = propose_fit(config, fit_budget, configs) if fit_budget is not None else None

    if args.json:
        out: dict[str, Any] = result.as_json()
        out["vram_bytes"] = vram
        out["fits"] = result.fits(vram) if vram is not None else None
        if fit_budget is not None:
            out["fit"] = {"budget_bytes": fit_budget, "changes": proposal[0] if proposal else None,
                          "peak_bytes": proposal[1].peak_bytes if proposal else None,
                          "needed_bytes": proposal[1].needed_bytes if proposal else None}
        print(json.dumps(out, indent=2))
        return 0

    d = result.details
    print(f"Estimate for {d['model']} ({d['configs_from']})")
    print(f"  sample: {d['frames']} frames -> {d['latent_frames']} latent frames x {d['height']} x {d['width']} patches = "
          f"{d['tokens']} tokens, batch {d['batch']}")
    notes = {
        "weights": result.weights_note(),
        "trainable_state": f"{d['trained_parameters'] / 1e6:.1f} M parameters, {d['optimizer']}",
        "activations": f"gradient_checkpointing {d['checkpointing']}",
        "workspace": "loss tensors, dequantized layer, optimizer step",
    }
    for part, value in result.parts.items():
        print(f"  {part:16s} {_gib(value)}  ({notes[part]})")
    for section, size in d.get("kept_text_encoders", {}).items():
        print(f"  {'':16s} of the weights: {section} kept loaded, {_gib(size).strip()}")
    for section, size in d.get("text_cache_bytes_per_caption", {}).items():
        print(f"  text cache       {size / 2**20:.1f} MiB per caption on disk for {section} (keep_loaded off)")
    if d.get("distributed"):
        print(f"  per process of {d['distributed']['processes']} (FSDP {d['distributed']['sharding']}): {d['distributed']['assumes']}")
    print(f"  {'peak':16s} {_gib(result.peak_bytes)}  (predicted torch.cuda.max_memory_allocated)")
    print(f"  {'needed':16s} {_gib(result.needed_bytes)}  (with the CUDA context and the allocator's reserve)")
    caching = d["caching"]
    unsized = f"; not counted: {', '.join(caching['unsized'])}" if caching["unsized"] else ""
    if caching["vae"] == 0 and caching["text"] == 0 and caching["unsized"]:
        # Nothing of the caching phase is sized for this model: no figure rather than a 0 that reads as "free".
        print(f"  {'caching':16s}   not sized  (this model's VAE and text encoders{unsized})")
        print("  the higher phase: training, of what is sized (the caching phase is not)")
    else:
        from core.memory.caching import stage_sized

        vae = _gib(caching["vae"]).strip() if stage_sized(caching, "vae") else "not sized"
        text = _gib(caching["text"]).strip() if stage_sized(caching, "text") else "not sized"
        print(f"  {'caching':16s} {_gib(result.caching_needed_bytes)}  (needed while filling the caches: VAE "
              f"{vae}{' tiled' if caching['tiled'] else ''}, text encoders {text}{unsized})")
        print(f"  the higher phase: {result.phase}{', of what is sized' if caching['unsized'] else ''}")
    print("  parts:")
    for part in d["parts"]:
        size = _gib(part["bytes"]) if part["bytes"] is not None else "  not sized"
        print(f"    {part['name']:16s} {size}  ({part['kind']}, {part['weight_dtype']}, on the GPU for {part['when']})")
    if vram is not None:
        verdict = "fits" if result.fits(vram) else "does not fit"
        print(f"{verdict} in {vram / GIB:.1f} GiB ({gpu})")
    else:
        print("no GPU detected: give --vram GB to compare")
    if fit_budget is not None:
        if proposal is None:
            print(f"nothing tried fits {args.fit:g} GiB: lower resolution, frames or batch_size, or lora.rank")
        elif not proposal[0]:
            print(f"fits {args.fit:g} GiB as it is")
        else:
            sets = " ".join(f"--set {key}={value}" for key, value in proposal[0].items())
            print(f"to fit {args.fit:g} GiB ({_gib(proposal[1].higher_phase_bytes).strip()} needed, {proposal[1].phase}): {sets}")
    return 0
