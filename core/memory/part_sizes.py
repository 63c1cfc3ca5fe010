"""The frozen parts besides the transformer, sized: each text encoder and the VAE.

What the estimate's parts list (`main.py estimate`, the window's estimate panel) and its caching
figure are made of. A part's parameters come from the model folder's safetensors headers where the
folder is there (exact: the tensors' shapes, read without loading them), else from its config.json
by the layout of its class (T5/UMT5 encoders, Llama decoders, CLIP text models). Its bytes in a
weight_dtype count the Linear layers of its blocks quantized (as the adapters' quantize filters
store them) and the rest (embeddings, norms) in the compute dtype.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .model_sizes import DTYPE_BYTES, compute_bytes, linear_bytes, text_encoder_sizes

SAFETENSORS_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                             "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class PartSizes:
    """One frozen part: what it is (its config's model_type or class), its parameter count and the
    Linear layers of its blocks, (in, out, bias, how many), that a quantized weight_dtype stores quantized."""

    name: str  # the pipeline component: "text_encoder", "text_encoder_2", "vae"
    kind: str  # "llama", "clip_text_model", "t5", "umt5", "AutoencoderKLWan", ...
    parameters: int
    linears: tuple[tuple[int, int, bool, int], ...] = ()
    hidden: int = 0  # a text encoder's width
    layers: int = 0
    ffn: int = 0
    heads: int = 0

    def weight_bytes(self, weight_dtype: str) -> int:
        if weight_dtype in DTYPE_BYTES or not self.linears:
            return self.parameters * DTYPE_BYTES.get(weight_dtype, compute_bytes(weight_dtype))
        quantized = sum(count * linear_bytes(i, o, bias, weight_dtype) for i, o, bias, count in self.linears)
        rest = self.parameters - sum(count * (i * o + (o if bias else 0)) for i, o, bias, count in self.linears)
        return quantized + max(rest, 0) * compute_bytes(weight_dtype)

    def caching_activation_bytes(self, tokens: int, batch: int, b: int) -> int:
        """A text encoder's peak tensors when it encodes `batch` captions of `tokens` without autograd:
        the hidden states kept (a Llama's every layer: the adapters read one of the last ones, asked for
        all as the pipelines do; a T5's or CLIP's last one, with the residual stream beside it), one
        layer's attention and feed-forward temporaries, and T5's position bias. No KV cache
        (loading.no_kv_cache). tests/test_caching_memory.py measures the real classes against it."""
        if not self.layers:
            return 0
        kept = self.layers + 1 if self.kind in ALL_HIDDEN_STATES else 2
        per_token = kept * self.hidden + 3 * self.ffn + 4 * self.hidden
        bias = self.heads * tokens * tokens if self.kind in ("t5", "umt5") else 0
        return batch * (tokens * per_token + bias) * b


# The kinds whose every layer's hidden state the adapters ask for (the Llama encoders, read at one
# or several of their layers); the others' callers read the last hidden state only.
ALL_HIDDEN_STATES = ("llama", "llava")


def folder_parameters(folder: Path) -> int | None:
    """The parameter count of a component folder from its safetensors headers (None without any)."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, entry in header.items():
            if key != "__metadata__":
                count = 1
                for side in entry["shape"]:
                    count *= int(side)
                total += count
    return total


def text_encoder_part(name: str, config: dict[str, Any], parameters: int | None = None) -> PartSizes | None:
    """A text encoder's sizes from its config.json (parameters, when given, from its files); None
    for a kind not sized here."""
    kind = str(config.get("model_type", ""))
    if kind in ("t5", "umt5"):
        te = text_encoder_sizes(config)
        inner = te.heads * te.d_kv
        linears = ((te.d_model, inner, False, 4 * te.layers), (te.d_model, te.d_ff, False, (2 if te.gated else 1) * te.layers),
                   (te.d_ff, te.d_model, False, te.layers))
        return PartSizes(name, kind, parameters or te.parameters(), linears, te.d_model, te.layers, te.d_ff, te.heads)
    if kind == "llama":
        d, ffn, layers = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or d // heads)
        kv = int(config.get("num_key_value_heads") or heads) * head_dim
        bias = bool(config.get("attention_bias", False))
        linears = ((d, heads * head_dim, bias, layers), (d, kv, bias, 2 * layers), (heads * head_dim, d, bias, layers),
                   (d, ffn, False, 2 * layers), (ffn, d, False, layers))
        # LlamaModel: the token embedding, the blocks, two RMSNorms per block and the final one (no lm_head).
        count = int(config["vocab_size"]) * d + sum(n * (i * o + (o if b else 0)) for i, o, b, n in linears) + (2 * layers + 1) * d
        return PartSizes(name, kind, parameters or count, linears, d, layers, ffn, heads)
    if kind == "clip_text_model":
        d, ffn, layers = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["num_hidden_layers"])
        linears = ((d, d, True, 4 * layers), (d, ffn, True, layers), (ffn, d, True, layers))
        # CLIPTextModel: token and position embeddings, the blocks with two LayerNorms each, the final LayerNorm.
        count = (int(config["vocab_size"]) + int(config.get("max_position_embeddings", 77))) * d
        count += sum(n * (i * o + o) for i, o, _, n in linears) + (2 * layers + 1) * 2 * d
        return PartSizes(name, kind, parameters or count, linears, d, layers, ffn, int(config["num_attention_heads"]))
    if kind == "llava":
        return _llava_part(name, config, parameters)
    return None


def _llava_part(name: str, config: dict[str, Any], parameters: int | None) -> PartSizes | None:
    """LlavaForConditionalGeneration: its language model (a Llama) with its lm_head, the CLIP vision
    tower and the two-layer projector; only the language model's block Linears quantize."""
    language = text_encoder_part(name, {"model_type": "llama", **config["text_config"]})
    vision = config["vision_config"]
    if language is None:
        return None
    h, ffn, layers = int(vision["hidden_size"]), int(vision["intermediate_size"]), int(vision["num_hidden_layers"])
    patches = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
    tower = 3 * int(vision["patch_size"]) ** 2 * h + h + (patches + 1) * h + 2 * h
    tower += layers * (4 * (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 4 * h) + 2 * h
    d = language.hidden
    projector = (h * d + d) + (d * d + d)
    head = int(config["text_config"]["vocab_size"]) * d
    count = language.parameters + tower + projector + head
    return PartSizes(name, "llava", parameters or count, language.linears, d, language.layers, language.ffn, language.heads)


def vae_part(config: dict[str, Any], parameters: int | None) -> PartSizes | None:
    """The VAE by its class, with its parameter count from its files or the built-in table (None: unknown)."""
    count = parameters if parameters is not None else config.get("parameters")
    if count is None:
        return None
    return PartSizes("vae", str(config.get("_class_name", "VAE")), int(count))


def vae_encode_activation_bytes(config: dict[str, Any], tiles: dict[str, int] | None, frames: int, height: int,
                                width: int, b: int) -> int | None:
    """Peak tensors of one clip's encoding by a VAE whose encoder starts at block_out_channels[0] at
    full resolution and encodes frames in chunks and, with `tiles`, space in tiles (diffusers'
    tiled_encode: tile_sample_min_* pixels each): about ENCODE_LIVE tensors of its first level's size
    (channels x chunk frames x tile pixels) are alive at once, and the moments of the whole clip are kept
    (three copies while tiles are blended). None where the VAE's layout is not known here."""
    if tiles is None or "block_out_channels" not in config:
        return None
    channels = int(config["block_out_channels"][0])
    chunk = min(frames, int(tiles["frames"]) + 1)
    tile_h, tile_w = (min(height, tiles["height"]), min(width, tiles["width"])) if tiles.get("spatial") else (height, width)
    spatial, temporal = int(tiles["spatial_ratio"]), int(tiles["temporal_ratio"])
    moments = 2 * int(config.get("latent_channels", 16)) * ((frames - 1) // temporal + 1) * (height // spatial) * (width // spatial)
    return int(ENCODE_LIVE * channels * chunk * tile_h * tile_w * b) + 3 * moments * b


# Measured with TensorMemoryProbe on the tiny VAE of tests/test_caching_memory.py: 4.15 to
# 4.2 first-level tensors alive at the peak of an untiled encoding (the causal convolutions' padded
# input, the GroupNorm and SiLU outputs and the residual), 4.7 to 5.0 tiled at tiles of 32 pixels,
# where the kept tile outputs weigh more against tiles that small than against real ones.
ENCODE_LIVE = 4.3
