"""The Wan VAE's (diffusers' AutoencoderKLWan: Wan 2.1's and Wan 2.2 TI2V-5B's) encoding memory.

The Wan adapter encodes a clip whole, untiled and unsliced (core/models/wan.py encode_video; an
image-to-video model encodes a second clip-sized video, the first frame and black ones, after the
first: the same peak). AutoencoderKLWan encodes causally: the first frame alone, then chunks of
CHUNK_FRAMES frames, each through the whole encoder, with a feature cache: every causal 3x3x3
convolution keeps the last CACHE_T frames of its input for the next chunk, each temporal
downsampler the last frame of its output. The peak is at the padding of a first-level (full
resolution after Wan 2.2's 2x2 patchify) residual block's convolution, of a chunk of t frames after
chunks that cached c: alive are the block's input, kept as its shortcut (t), its activated input
(t), the cache concatenated in front (t + c), the old cache entry (c), the padded input (t + 2, a
pixel more on each side) and Wan 2.2's residual down block's copies of its input (t, or 2t from its
second residual block on); in half precision the peak can be at an RMS norm instead, which
normalizes in float32. Besides them: the whole feature cache, the clip on the GPU in the VAE's
dtype (and Wan 2.2's patchified copy) and the latent moments of the whole clip (with an
image-to-video model's first encoding beside its second). The peak is the
largest over the first chunk (c = 0), the second (c = 1) and the third on (c = 2).
tests/test_wan_vae_memory.py measures the class against it with TensorMemoryProbe: 1.00 to 1.03
times the measured peak.
"""

from __future__ import annotations

from typing import Any

CACHE_T = 2  # diffusers' autoencoder_kl_wan.CACHE_T: frames each causal convolution keeps
CHUNK_FRAMES = 4  # frames per encoder call after the first frame (AutoencoderKLWan._encode)

# AutoencoderKLWan.__init__'s defaults (diffusers 0.42): Wan 2.1's VAE, and what a config.json leaves out.
AUTOENCODER_KL_WAN_DEFAULTS: dict[str, Any] = {
    "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
    "temperal_downsample": [False, True, True], "is_residual": False, "in_channels": 3, "patch_size": None,
    "scale_factor_temporal": 4, "scale_factor_spatial": 8,
}


def _layout(config: dict[str, Any]) -> dict[str, Any]:
    return {**AUTOENCODER_KL_WAN_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}


def _feature_cache_elements(layout: dict[str, Any], height: int, width: int, first: int, rest: int) -> int:
    """The encoder's feature cache (per batch item) with `first` frames kept at the first level (conv_in
    and its residual blocks) and `rest` below: two convolutions per residual block (the first's at the
    block's input width), each temporal downsampler's last output frame, the middle block's two
    residual blocks and conv_out."""
    dims = [int(layout["base_dim"]) * int(m) for m in [1, *layout["dim_mult"]]]
    blocks, levels = int(layout["num_res_blocks"]), len(layout["dim_mult"])
    temporal = list(layout["temperal_downsample"])
    total = first * int(layout["in_channels"]) * height * width
    for level in range(levels):
        area = (height >> level) * (width >> level)
        total += (first if level == 0 else rest) * (dims[level] + (2 * blocks - 1) * dims[level + 1]) * area
        if level < levels - 1 and temporal[level]:
            total += min(rest, 1) * dims[level + 1] * (height >> (level + 1)) * (width >> (level + 1))
    last_area = (height >> (levels - 1)) * (width >> (levels - 1))
    return total + rest * 5 * dims[-1] * last_area


def _chunk_peak_bytes(layout: dict[str, Any], chunk: int, cached: int, height: int, width: int, b: int) -> int:
    """Bytes alive at the peak of a first-level residual block, for a chunk of `chunk` frames after
    chunks that left `cached` frames in the cache (0 before the first): the first level's caches
    already hold this chunk's frames, the levels below the previous chunks'."""
    frame = int(layout["base_dim"]) * height * width  # one frame of the first level
    # A residual down block keeps its input cloned (x_copy) and, from its second residual block on,
    # also the input itself (the encoder's reference): one or two more chunk tensors.
    kept = (2 if int(layout["num_res_blocks"]) > 1 else 1) * chunk if layout["is_residual"] else 0
    # At a convolution's padding: the block's input (its shortcut) and its activated input, the
    # cached frames concatenated in front (the convolution's output in the first chunk), the old
    # cache entry, and the padded input (CACHE_T frames in front, cached or zeros; a pixel more on each side).
    padding = (2 * chunk + kept + chunk + 2 * cached) * frame * b
    padding += (chunk + CACHE_T) * int(layout["base_dim"]) * (height + 2) * (width + 2) * b
    # At an RMS norm in half precision: the shortcut and the input beside the input upcast to float32
    # and its float32 normalization, with its one-channel denominator (WanRMS_norm normalizes in float32).
    upcast = 2 * chunk * frame * 4 + chunk * height * width * 4 if b < 4 else 0
    norm = (2 * chunk + kept) * frame * b + upcast
    cache = _feature_cache_elements(layout, height, width, min(chunk + cached, CACHE_T), cached)
    return max(padding, norm) + cache * b


def wan_vae_encode_activation_bytes(config: dict[str, Any], frames: int, height: int, width: int, b: int) -> int:
    """Peak bytes of one clip's encoding (frames x height x width pixels) by AutoencoderKLWan of
    `config` in a dtype of `b` bytes, without its weights (see the module docstring)."""
    layout = _layout(config)
    patch = int(layout["patch_size"] or 1)
    h0, w0 = height // patch, width // patch
    # (frames, cached frames) of the first chunk, the second (after the first frame) and the third on.
    chunks = [(1, 0)] + ([(min(CHUNK_FRAMES, frames - 1), 1)] if frames > 1 else [])
    chunks += [(min(CHUNK_FRAMES, frames - 1 - CHUNK_FRAMES), CACHE_T)] if frames > 1 + CHUNK_FRAMES else []
    peak = max(_chunk_peak_bytes(layout, t, c, h0, w0, b) for t, c in chunks)
    clip = 3 * frames * height * width * (2 if patch > 1 else 1)  # on the GPU, and Wan 2.2's patchified copy
    spatial, temporal = int(layout["scale_factor_spatial"]), int(layout["scale_factor_temporal"])
    moments = 2 * int(layout["z_dim"]) * ((frames - 1) // temporal + 1) * (height // spatial) * (width // spatial)
    # The moments being gathered chunk by chunk and, for an image-to-video model encoding its condition
    # video, the first encoding's posterior (moments, std, var) and normalized latents (with the
    # per-channel float32 mean and std they were normalized by): 4 at most.
    return int(peak + (clip + 4 * moments) * b + 2 * int(layout["z_dim"]) * 4)
