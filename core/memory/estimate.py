"""The VRAM estimator: peak GPU memory of a training step, from the model's real sizes and the settings.

It predicts torch.cuda.max_memory_allocated() of a training step, split into four parts:

- weights: the frozen weights resident on the GPU (model_sizes.py gives their exact bytes per
  weight_dtype): every transformer block not offloaded, the parts outside the blocks, `slots`
  offloaded blocks in flight, and the text encoder when it is in the graph (EMBEDDING, or trained);
- trainable_state: trained parameters in float32, their float32 gradients and the optimizer state;
- activations: what autograd holds at the peak of the backward pass (activation_bytes below, from
  the per-block counts of model_sizes.py);
- workspace: the transient dequantized weight of the largest quantized layer, the autocast copies
  of fully trained weights, the optimizer step's temporaries and the latent-sized loss tensors.

The caching phase before training (core/memory/caching.py: the VAE encoding the clips, then the text
encoders the captions) has its own peak, details["caching"]; `phase` says which of the two is higher
and `fits` asks that the higher one fit. details["parts"] lists every part the run loads (the
transformer, each text encoder, the VAE) with its weight_dtype and bytes.

needed_bytes adds what max_memory_allocated does not see: the CUDA context and library handles
(CUDA_CONTEXT_BYTES) and the caching allocator's reserve beyond allocated (ALLOCATOR_OVERHEAD).
These two and BACKWARD_EXTRA are the calibration constants; docs/memory.md says where each comes
from and which GPU measurement would replace it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .caching import caching_memory, model_parts
from .known_models import ModelConfigs, model_configs
from .part_sizes import text_encoder_part
from .model_sizes import (
    DTYPE_BYTES,
    IMAGE_TRANSFORMERS,
    BlockStack,
    QUANTIZED,
    TransformerSizes,
    block_activation_bytes,
    compute_bytes,
    text_encoder_activation_bytes,
    text_encoder_sizes,
    transformer_class,
    transformer_sizes,
)

GIB = 2**30
DEFAULT_SLOTS = 2  # offload.DEFAULT_SLOTS, without importing torch
TEXT_TOKENS = 512  # the default text length; each family's is TransformerSizes.text_tokens (model_sizes.py)
# Measured on a CPU (tests/test_estimate.py, TensorMemoryProbe): the backward pass of one block
# holds, on top of its recomputed activations, gradients and temporaries of 0.33-0.38 times their size.
BACKWARD_EXTRA = 0.4
# Not measured here (no GPU): typical CUDA context + cuBLAS/cuDNN handles, and the caching
# allocator's reserved-over-allocated margin. To be replaced by benchmarks/gpu_acceptance.py's figures.
CUDA_CONTEXT_BYTES = 512 * 2**20
ALLOCATOR_OVERHEAD = 0.10
# Optimizer state bytes per trained parameter (fp32 states): AdamW exp_avg + exp_avg_sq; 8-bit
# AdamW one byte each; SGD momentum; Prodigy exp_avg, exp_avg_sq, s and p0. Adafactor is factored.
OPTIMIZER_STATE_BYTES = {"ADAMW": 8, "ADAMW_8BIT": 2, "SGD": 4, "PRODIGY": 16}
# foreach optimizers build a temporary the size of the parameters (fp32) during step(); bitsandbytes' does not.
STEP_TEMPORARY_BYTES = {"ADAMW": 4, "ADAMW_8BIT": 0, "SGD": 4, "PRODIGY": 4, "ADAFACTOR": 4}


@dataclass
class Estimate:
    peak_bytes: int
    parts: dict[str, int]
    needed_bytes: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def caching_needed_bytes(self) -> int:
        """What filling the caches needs, with the same context and reserve as a training step (0 unknown)."""
        peak = int((self.details.get("caching") or {}).get("peak", 0))
        return int(peak * (1 + ALLOCATOR_OVERHEAD)) + CUDA_CONTEXT_BYTES if peak else 0

    @property
    def phase(self) -> str:
        """The phase with the higher peak: "training" or "caching"."""
        return "caching" if self.caching_needed_bytes > self.needed_bytes else "training"

    @property
    def higher_phase_bytes(self) -> int:
        """What the higher of the two phases needs: what a GPU must have."""
        return max(self.needed_bytes, self.caching_needed_bytes)

    def fits(self, vram_bytes: int) -> bool:
        return self.higher_phase_bytes <= vram_bytes

    def weights_note(self) -> str:
        """What the weights line counts, in the words `main.py estimate` and the window print."""
        d = self.details
        if not self.parts.get("weights") and d.get("trained_parameters"):
            return "none frozen: every weight trains, counted in trainable_state"
        experts = f", {d['transformers']} transformers" if d.get("transformers", 1) > 1 else ""
        return f"{d.get('weight_dtype')}, {d.get('offloaded_blocks')} of {d.get('blocks')} blocks offloaded{experts}"

    def as_json(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "needed_bytes": self.needed_bytes, "parts": dict(self.parts),
                "caching_needed_bytes": self.caching_needed_bytes, "phase": self.phase, "details": self.details}


# --------------------------------------------------------------------------------------------------
# Activations


def lora_weight_cast_bytes(t: TransformerSizes, targets: list[tuple[int, int]], rank: int, b: int) -> int:
    """Autocast's compute-dtype copies of one block's LoRA matrices (only when computing below float32)."""
    return 0 if b >= 4 else sum(rank * (i + o) * b for i, o in targets)


# --------------------------------------------------------------------------------------------------
# The estimate


def tokens_per_sample(config: dict[str, Any], t: TransformerSizes, spatial: int, temporal: int) -> dict[str, int]:
    """Latent frames, latent height/width in patches, and tokens of the largest training sample."""
    # An image model trains every sample as one frame (its adapter's frame rule), as the data plan does.
    frames = 1 if transformer_class(t.config) in IMAGE_TRANSFORMERS else max(1, config["frames"])
    frames = (frames - 1) // temporal * temporal + 1  # rounded down to k * ratio + 1
    latent_frames = (frames - 1) // temporal + 1
    # A transformer that patches time takes a multiple of its temporal patch: the adapter pads the
    # latents in front up to it (copies of the first latent frame).
    latent_frames += -latent_frames % t.patch[0]
    side = max(1, config["resolution"] // (spatial * t.patch[1]))
    height = width = side
    if t.config.get("use_learned_positional_embeddings"):
        # Positional embeddings learned for one size (sample_height x sample_width latent cells): every clip trains at it.
        height, width = int(t.config["sample_height"]) // t.patch[1], int(t.config["sample_width"]) // t.patch[2]
    return {"frames": frames, "latent_frames": latent_frames, "side": side, "height": height, "width": width,
            "tokens": math.ceil(latent_frames / t.patch[0]) * height * width}


def estimate_memory(config: dict[str, Any], configs: ModelConfigs | None = None,
                    calibration: dict[str, dict[str, float]] | None = None) -> Estimate:
    """The estimate for a complete, resolved settings dict (core.config.resolve).

    calibration: {transformer class: {checkpointing: factor}} (core.memory.calibration.load_calibration);
    default the calibration file's. The transformer's activation term is multiplied by the factor of
    its class and checkpointing mode, 1.0 where there is none (details["activation_factor"])."""
    from .calibration import activation_factor
    from .offload import offloaded_block_count, offloaded_block_indices  # torch-free at import

    configs = configs or model_configs(config["base_model"])
    transformers = [transformer_sizes(c) for c in configs.transformers]
    # A two-expert model training one expert loads only that one (core/train/experts.py, chosen_denoisers).
    one_expert = (config.get("experts") or {}).get("train", "BOTH")
    if len(transformers) == 2 and one_expert in ("HIGH_NOISE", "LOW_NOISE"):
        transformers = [transformers[0 if one_expert == "HIGH_NOISE" else 1]]
    t = transformers[0]
    spatial = int(configs.vae.get("scale_factor_spatial", config["video_config"]["spatial_compression_ratio"]))
    temporal = int(configs.vae.get("scale_factor_temporal", config["video_config"]["temporal_compression_ratio"]))
    shape = tokens_per_sample(config, t, spatial, temporal)
    # Videos come video_batch_size_multiplier times batch_size at a time, images (one frame) batch_size
    # at a time: the larger of the two (tokens x samples) sets the activations.
    video_batch = max(1, round(config["batch_size"] * config["video_config"]["video_batch_size_multiplier"]))
    image_tokens = shape["height"] * shape["width"]
    if shape["frames"] > 1 and video_batch * shape["tokens"] >= config["batch_size"] * image_tokens:
        L, batch = shape["tokens"], video_batch
    else:
        shape.update(frames=1, latent_frames=1, tokens=image_tokens)
        L, batch = image_tokens, config["batch_size"]
    method = config["training_method"]
    train_b = {"FLOAT_32": 4}.get(config["train_dtype"], 2)
    wdtype = config["transformer"]["weight_dtype"]
    full_transformer = method == "FINE_TUNE" and config["transformer"]["train"]
    lora = method == "LORA"
    rank = config["lora"]["rank"] if lora else 0
    checkpointing = config["gradient_checkpointing"]
    fraction = config["layer_offload_fraction"] if checkpointing != "OFF" and not full_transformer else 0.0
    details: dict[str, Any] = {"model": configs.name, "configs_from": configs.source, **shape, "batch": batch,
                               "transformers": len(transformers), "blocks": t.n_blocks}
    shards = _fsdp_processes(config)  # 1: nothing sharded (one process, or DDP's whole copy in each)

    # weights
    weights = 0
    offloaded = offloaded_block_count(fraction, t.n_blocks)
    if not full_transformer:
        for sizes in transformers:
            in_flight = min(DEFAULT_SLOTS, offloaded)
            indices = offloaded_block_indices(fraction, sizes.n_blocks)
            weights += sizes.blocks_bytes(wdtype, indices, in_flight) + sizes.outside_bytes(wdtype)
    transformer_weights = weights  # what FSDP shards of the weights (the text encoders stay whole)
    details.update(offloaded_blocks=offloaded, weight_dtype=wdtype)
    text_in_graph = method == "EMBEDDING" or config["text_encoder"]["train"]
    text_full = config["text_encoder"]["train"] and method == "FINE_TUNE"
    # The first text encoder, sized by its own layout (part_sizes: T5, Llama, CLIP, Llava); the T5
    # layout where that does not know it, and for the activations of one in the graph.
    first_encoder = configs.encoders().get("text_encoder") or configs.text_encoder
    te = text_encoder_sizes(first_encoder)
    te_part = text_encoder_part("text_encoder", first_encoder, configs.parameters.get("text_encoder"))
    te_dtype = config["text_encoder"]["weight_dtype"]
    if text_in_graph and not text_full:
        weights += te_part.weight_bytes(te_dtype) if te_part else te.weight_bytes(te_dtype)
    kept, cache_per_caption = other_text_encoder_bytes(config, configs)
    weights += sum(kept.values())
    other_weights, other_activations = _other_encoders_in_graph(config, configs, method, set(kept))
    weights += other_weights
    details.update(kept_text_encoders=kept, text_cache_bytes_per_caption=cache_per_caption)

    # trainable parameters: LoRA and embedding rows train in float32 (weight, gradient, float32 state);
    # FINE_TUNE trains the weights in their own storage (bfloat16 or float32), with gradients of that
    # size unless fused_backward frees each one inside the backward pass (core/train/finetune.py).
    optimizer = config["optimizer"]
    fused = full_transformer and config["fused_backward"]
    stack_targets = [(stack.count, _lora_targets(config, stack)) for stack in t.block_stacks()] if lora else []
    # One block's LoRA'd layers (the largest stack's block, for the per-block activation terms).
    targets = max((found for _, found in stack_targets), key=len, default=[])
    small = 0  # float32-trained parameters (LoRA, embedding rows)
    small_factored = 0
    if lora and config["transformer"]["train"]:
        for count, found in stack_targets:
            small += len(transformers) * count * sum(rank * (i + o) for i, o in found)
            small_factored += len(transformers) * count * sum(4 * (rank + i) + 4 * (o + rank) for i, o in found)
    if method == "EMBEDDING":
        small += len(config["embedding"]["placeholder_tokens"]) * (te_part.hidden if te_part else te.d_model)
    full: list[tuple[int, int, int]] = []  # (parameters, bytes per weight, Adafactor's factored state in fp32 bytes)
    if full_transformer:
        full += [(s.parameters(), DTYPE_BYTES.get(wdtype, 4), 4 * s.block_linear_factors()) for s in transformers]
    if text_full:
        # Adafactor's factored state: a row and a column vector per block Linear.
        factored = (4 * sum(n * (i + o) for i, o, _, n in te_part.linears) if te_part
                    else 4 * te.layers * (4 * (te.d_model + te.heads * te.d_kv) + 3 * (te.d_model + te.d_ff)))
        full.append((te_part.parameters if te_part else te.parameters(), DTYPE_BYTES.get(te_dtype, 4), factored))
    state = small_factored if optimizer == "ADAFACTOR" else small * OPTIMIZER_STATE_BYTES[optimizer]
    trainable_state = small * 8 + state
    for params, wb, factored in full:
        if shards > 1 and train_b < 4:
            wb = 4  # accelerate's FSDP keeps float32 master weights of what trains under mixed precision
        per_weight_state = {"ADAMW": 2 * wb, "ADAMW_8BIT": 2, "SGD": wb, "PRODIGY": 4 * wb}
        state_bytes = factored * wb // 4 if optimizer == "ADAFACTOR" else params * per_weight_state[optimizer]
        trainable_state += params * wb + (0 if fused else params * wb) + state_bytes
    trained = small + sum(params for params, _, _ in full)
    details.update(trained_parameters=trained, optimizer=optimizer, fused_backward=fused)

    # activations (per sample, times the batch; shared per-step tensors once)
    per_token_ts = configs.expand_timesteps
    text_tokens = t.text_tokens
    # A joint-attention block (text and video in one sequence) is counted as a block over L + text
    # tokens with no cross-attention; its text stream is part of each block's input.
    block_L, cross_T = (L + text_tokens, 0) if t.joint_text else (L, text_tokens)
    act_block = block_activation_bytes(t, block_L, cross_T, train_b, lora_rank=rank, per_token_timesteps=per_token_ts)
    casts = lora_weight_cast_bytes(t, targets, rank, train_b)
    block_inputs = block_L * t.dim * train_b
    shared = text_tokens * t.dim * train_b + (L if per_token_ts else 1) * 6 * t.dim * train_b
    outside = L * t.dim * 4
    if checkpointing == "OFF":
        stored = t.n_blocks * act_block * batch + t.n_blocks * casts
    elif checkpointing == "ON":
        stored = t.n_blocks * block_inputs * batch + act_block * batch + casts
    else:  # CPU_OFFLOADED: the saved inputs wait in CPU memory; one block's come back at a time
        stored = block_inputs * batch + act_block * batch + casts
    activations = stored + shared * batch + outside * batch + 8 * L * t.head_dim + int(BACKWARD_EXTRA * act_block * batch)
    factor = activation_factor(transformer_class(t.config), checkpointing, calibration)
    if factor != 1.0:
        activations = int(activations * factor)
    details["activation_factor"] = factor
    if text_in_graph:
        activations += text_encoder_activation_bytes(first_encoder, text_tokens, train_b) * batch
    activations += other_activations(text_tokens, train_b) * batch
    details["checkpointing"] = checkpointing

    # workspace
    channels = t.out_channels
    latent_elements = batch * channels * shape["latent_frames"] * shape["height"] * t.patch[1] * shape["width"] * t.patch[2]
    workspace = latent_elements * 4 * 6  # latents, noise, noisy input, target, prediction, its gradient (float32)
    if wdtype in QUANTIZED and not full_transformer:
        workspace += t.max_linear_elements() * compute_bytes(wdtype)  # one layer dequantized at a time
    if full_transformer and DTYPE_BYTES.get(wdtype, 4) != train_b and shards == 1:
        workspace += sum(s.parameters() for s in transformers) * train_b  # autocast's copies of the trained weights
    # A fused backward and Adafactor step one weight at a time: their temporaries are one layer's.
    per_weight = fused or optimizer == "ADAFACTOR"
    step_peak = (t.max_linear_elements() * 4) if per_weight and full else trained * STEP_TEMPORARY_BYTES[optimizer]

    parts = {"weights": weights, "trainable_state": trainable_state, "activations": activations,
             "workspace": max(workspace, step_peak)}
    side = shape["side"] * spatial * t.patch[1]  # the largest sample's pixels, as a square of its area
    details["caching"] = caching_memory(config, configs, t, shape["frames"], side)
    trained_text = {name: method == "EMBEDDING" or bool((config.get(name) or {}).get("train")) for name in configs.encoders()}
    transformer_bytes = sum(s.total_bytes(wdtype) for s in transformers)
    details["parts"] = model_parts(config, configs, transformer_bytes, t, trained_text)
    if shards > 1:
        _shard(parts, details, config, t, shards, trained_blocks=full_transformer, step_peak=step_peak,
               workspace=workspace, train_b=train_b, transformer_weights=transformer_weights)
    peak = sum(parts.values())
    needed = int(peak * (1 + ALLOCATOR_OVERHEAD)) + CUDA_CONTEXT_BYTES
    return Estimate(peak, parts, needed, details)


def _other_encoders_in_graph(config: dict[str, Any], configs: ModelConfigs, method: str,
                             kept: set[str]) -> tuple[int, Any]:
    """(weight bytes, activation bytes per sample as a function of (tokens, bytes per value)) of the
    text encoders after the first that run in the training step's graph: all of them with EMBEDDING
    (a placeholder per tokenizer), a section with `train` set. Those kept loaded are counted already."""
    in_graph = {name: c for name, c in configs.other_text_encoders().items()
                if name not in kept and (method == "EMBEDDING" or bool((config.get(name) or {}).get("train")))}
    weights = 0
    for name, encoder in in_graph.items():
        part = text_encoder_part(name, encoder, configs.parameters.get(name))
        if part is not None:
            weights += part.weight_bytes(str((config.get(name) or {}).get("weight_dtype", "BFLOAT_16")))

    def activations(tokens: int, b: int) -> int:
        # A CLIP's 77 tokens, not the transformer's text length (the pipelines encode it so).
        return sum(text_encoder_activation_bytes(c, min(tokens, int(c.get("max_position_embeddings", tokens))), b)
                   for c in in_graph.values() if c.get("model_type") in ("clip_text_model", "t5", "umt5", "llama"))

    return weights, activations


def other_text_encoder_bytes(config: dict[str, Any], configs: ModelConfigs) -> tuple[dict[str, int], dict[str, int]]:
    """({section: weight bytes} of the text encoders kept loaded through the steps (keep_loaded),
    {section: bytes per caption} the text cache holds of the others), for those text_sizes.py sizes.
    A kept encoder's forward runs without a graph before the transformer's, so only its weights are
    resident at the backward's peak."""
    from .text_sizes import cached_condition_bytes, text_encoder_weight_bytes

    kept: dict[str, int] = {}
    cached: dict[str, int] = {}
    for section, encoder in configs.other_text_encoders().items():
        part = config.get(section) or {}
        weight_dtype = str(part.get("weight_dtype", "BFLOAT_16"))
        if part.get("keep_loaded"):
            size = text_encoder_weight_bytes(encoder, weight_dtype)
            if size is not None:
                kept[section] = size
        else:
            size = cached_condition_bytes(configs.transformers[0], encoder, weight_dtype)
            if size is not None:
                cached[section] = size
    return kept, cached


def _fsdp_processes(config: dict[str, Any]) -> int:
    """The processes one shard is split over: all of them, or with HYBRID_SHARD one machine's."""
    distributed = config.get("distributed") or {}
    if distributed.get("strategy") != "FSDP":
        return 1
    processes = max(1, int(distributed.get("processes") or 1))
    if distributed.get("sharding") == "HYBRID_SHARD":
        processes //= max(1, int(distributed.get("machines") or 1))
    return max(1, processes)


def _shard(parts: dict[str, int], details: dict[str, Any], config: dict[str, Any], t: TransformerSizes, n: int, *,
           trained_blocks: bool, step_peak: int, workspace: int, train_b: int, transformer_weights: int) -> None:
    """FSDP over n processes (core/train/fsdp.py): each holds 1/n of every parameter, gradient and
    optimizer state; a block's parameters are gathered whole for its forward and backward (FULL_SHARD:
    this block and the prefetched next one; SHARD_GRAD_OP: every block from its forward to its
    backward, so all of them at the backward's start); activations are each process's own."""
    sharding = config["distributed"]["sharding"]
    whole = transformer_weights  # the frozen transformer's (0 for FINE_TUNE, whose weights train)
    if trained_blocks:  # FINE_TUNE: the gathered copies are in the compute dtype
        each = [n_params * train_b for n_params in (s.block_parameters() for s in t.block_stacks() for _ in range(s.count))]
    else:
        each = t.each_block_bytes(config["transformer"]["weight_dtype"])
    gathered = sum(each) if sharding == "SHARD_GRAD_OP" else sum(sorted(each, reverse=True)[:2])
    # The root unit (everything outside the blocks) is gathered for the whole step.
    block_params = sum(s.count * s.block_parameters() for s in t.block_stacks())
    gathered += (t.parameters() - block_params) * train_b if trained_blocks else t.outside_bytes(config["transformer"]["weight_dtype"])
    if whole and sharding == "SHARD_GRAD_OP":
        gathered = whole - whole // n  # every block whole again at the peak: no saving on the weights
    parts["weights"] += whole // n + gathered - whole  # the text encoders' weights stay as they are
    parts["trainable_state"] //= n
    parts["workspace"] = max(workspace, step_peak // n)
    details["distributed"] = {
        "strategy": "FSDP", "processes": n, "sharding": sharding,
        "assumes": f"parameters, gradients and optimizer state divided by {n} processes{' (of a machine)' if sharding == 'HYBRID_SHARD' else ''}; {'every block' if sharding == 'SHARD_GRAD_OP' else 'two blocks'} "
                   "gathered whole at the peak; activations per process, not divided"
                   + ("; float32 master weights of the trained weights (accelerate's FSDP mixed precision)" if trained_blocks and train_b < 4 else ""),
    }


def _lora_targets(config: dict[str, Any], stack: BlockStack) -> list[tuple[int, int]]:
    """(in, out) of each LoRA'd Linear in one block of a stack: lora.target_layers (name suffixes), else
    the adapter's defaults for the known models (attention projections and the feed-forward pair)."""
    shapes = {name: (i, o) for name, i, o in stack.linears}
    defaults = list(stack.lora_defaults) if stack.lora_defaults is not None else [n for n in shapes if not n.startswith("attn2.add_")]
    wanted = config["lora"]["target_layers"] or defaults
    return [shape for name, shape in shapes.items() if any(name == w or name.endswith("." + w) or w.endswith(name) for w in wanted)]


def detect_vram() -> tuple[int, str] | None:
    """(total bytes, name) of CUDA device 0, or None without one (imports torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return int(props.total_memory), str(props.name)


__all__ = [
    "ALLOCATOR_OVERHEAD",
    "BACKWARD_EXTRA",
    "CUDA_CONTEXT_BYTES",
    "DTYPE_BYTES",
    "GIB",
    "Estimate",
    "block_activation_bytes",
    "detect_vram",
    "estimate_memory",
    "tokens_per_sample",
]
