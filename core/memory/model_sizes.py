"""The real sizes of a model's parts, from their config files alone (no torch, no weights).

A Wan transformer's tensors are listed the way diffusers' WanTransformer3DModel builds them
(diffusers 0.42, models/transformers/transformer_wan.py): per block the attention projections,
the feed-forward pair, the q/k RMSNorms, norm2 (cross_attn_norm) and the block's scale_shift_table;
outside the blocks the patch embedding (Conv3d), the condition embedder, proj_out, the output
scale_shift_table and the rotary tables (buffers). Loaded with torch_dtype=bfloat16, diffusers
keeps `_keep_in_fp32_modules` (rope, time_embedder, scale_shift_table, norm1/2/3) in float32;
this is reproduced. tests/test_estimate.py checks the byte counts against part_summary of the real
classes, for every weight_dtype, on the tiny models.

Bytes of one Linear layer per weight_dtype (quantized types keep the bias and the quanto scalar
buffers in the compute dtype):
- FLOAT_32 / BFLOAT_16 / FLOAT_16: in*out + out (bias) elements of 4 / 2 / 2 bytes;
- FLOAT_8, INT_8 (quanto): in*out bytes + one scale per output row + bias + 2 scalars;
- INT_4 (quanto qint4): in*out/2 bytes + a scale and a shift per group of g inputs per row
  (g: 128, lowered by 32 until it divides in, at least 32; else one group per row) + bias + 2 scalars;
- NFLOAT_4 (bitsandbytes nf4, blocks of 64, double quantization): in*out/2 bytes + one uint8
  absmax per block + one float32 absmax per 256 blocks + offset + 16-entry and 256-entry float32
  code tables + bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

DTYPE_BYTES = {"FLOAT_32": 4, "BFLOAT_16": 2, "FLOAT_16": 2}
QUANTIZED = ("FLOAT_8", "INT_8", "INT_4", "NFLOAT_4")
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256


def compute_bytes(weight_dtype: str) -> int:
    """Bytes per element of the compute dtype a weight_dtype loads in (quantized types: bfloat16)."""
    return DTYPE_BYTES.get(weight_dtype, 2)


def quanto_int4_group(in_features: int) -> int | None:
    """optimum-quanto's qint4 group size for a layer (QModuleMixin.__init__), None for one per row."""
    group = 128
    if in_features <= group:
        return None
    while in_features % group != 0 and group > 32:
        group -= 32
    return group if in_features % group == 0 else None


def linear_bytes(in_features: int, out_features: int, bias: bool, weight_dtype: str) -> int:
    """Bytes of an nn.Linear's weight and bias stored as weight_dtype (see the module docstring)."""
    base = compute_bytes(weight_dtype)
    n = in_features * out_features
    bias_bytes = out_features * base if bias else 0
    if weight_dtype in DTYPE_BYTES:
        return n * base + bias_bytes
    if weight_dtype in ("FLOAT_8", "INT_8"):
        return n + out_features * base + bias_bytes + 2 * base
    if weight_dtype == "INT_4":
        group = quanto_int4_group(in_features)
        groups = out_features * (in_features // group) if group else out_features
        return n // 2 + 2 * groups * base + bias_bytes + 2 * base
    if weight_dtype == "NFLOAT_4":
        blocks = math.ceil(n / NF4_BLOCK)
        nested = math.ceil(blocks / NF4_NESTED_BLOCK)
        return math.ceil(n / 2) + blocks + 4 * nested + 4 + 16 * 4 + 256 * 4 + bias_bytes
    raise ValueError(f"unknown weight_dtype {weight_dtype!r}")


@dataclass
class BlockStack:
    """One stack of identical blocks of a transformer with several (dual- then single-stream)."""

    name: str  # the ModuleList's attribute: "transformer_blocks", "single_transformer_blocks"
    count: int
    linears: list[tuple[str, int, int]]  # (name in the block, in, out), with a bias unless named in unbiased
    other: list[tuple[str, int, bool]]  # (name, elements, kept in float32)
    lora_defaults: tuple[str, ...] | None = None  # the adapter's default LoRA targets in this stack's blocks
    unbiased: frozenset[str] = frozenset()  # the linears without a bias (such as SwiGLU experts' w1, w2, w3)

    def block_bytes(self, weight_dtype: str, quantize_blocks: bool = True) -> int:
        base = compute_bytes(weight_dtype)
        linear_dtype = weight_dtype if quantize_blocks else {4: "FLOAT_32", 2: "BFLOAT_16"}[base]
        total = sum(linear_bytes(i, o, name not in self.unbiased, linear_dtype) for name, i, o in self.linears)
        return total + sum(n * (4 if fp32 else base) for _, n, fp32 in self.other)

    def block_parameters(self) -> int:
        return (sum(i * o + (0 if name in self.unbiased else o) for name, i, o in self.linears)
                + sum(n for _, n, _ in self.other))


@dataclass
class TransformerSizes:
    """One transformer's shape and tensors, from its config.json: one stack of n_blocks blocks
    (block_linears, block_other), or several (`stacks`, in forward order; n_blocks is their sum)."""

    config: dict[str, Any]
    n_blocks: int
    dim: int
    heads: int
    head_dim: int
    ffn_dim: int
    text_dim: int
    patch: tuple[int, int, int]
    in_channels: int
    out_channels: int
    block_linears: list[tuple[str, int, int]] = field(default_factory=list)  # (name, in, out), all with bias
    block_other: list[tuple[str, int, bool]] = field(default_factory=list)  # (name, elements, kept in float32)
    outside_linears: list[tuple[str, int, int, bool]] = field(default_factory=list)  # (name, in, out, float32)
    outside_other: list[tuple[str, int, bool]] = field(default_factory=list)
    buffer_bytes: int = 0  # rotary tables, float32
    text_tokens: int = 512  # the text length the cached embeddings are padded to
    joint_text: bool = False  # text tokens join the video tokens in one self-attention (no cross-attention)
    lora_defaults: tuple[str, ...] | None = None  # the adapter's default LoRA targets; None: every block Linear
    stacks: list[BlockStack] = field(default_factory=list)  # several stacks; empty: the one above

    def block_stacks(self) -> list[BlockStack]:
        """The stacks in forward order: `stacks`, or the one stack of block_linears and block_other."""
        if self.stacks:
            return self.stacks
        return [BlockStack("blocks", self.n_blocks, self.block_linears, self.block_other, self.lora_defaults)]

    def block_bytes(self, weight_dtype: str, quantize_blocks: bool = True) -> int:
        """Bytes of one block (of the first stack) with its Linear layers in weight_dtype (others in
        the compute dtype)."""
        return self.block_stacks()[0].block_bytes(weight_dtype, quantize_blocks)

    def each_block_bytes(self, weight_dtype: str) -> list[int]:
        """Bytes of every block in forward order, as layer offloading numbers them over all stacks."""
        return [stack.block_bytes(weight_dtype) for stack in self.block_stacks() for _ in range(stack.count)]

    def blocks_bytes(self, weight_dtype: str, offloaded: list[int], in_flight: int) -> int:
        """Bytes of the blocks resident on the GPU: all but the `offloaded` indices, and `in_flight`
        offloaded blocks (the largest of them) on their way in."""
        each = self.each_block_bytes(weight_dtype)
        away = sorted((each[i] for i in offloaded), reverse=True)
        return sum(each) - sum(away) + sum(away[:in_flight])

    def outside_bytes(self, weight_dtype: str) -> int:
        """Bytes of everything outside the blocks (never quantized by default), buffers included."""
        base = compute_bytes(weight_dtype)
        total = sum((i * o + o) * (4 if fp32 else base) for _, i, o, fp32 in self.outside_linears)
        total += sum(n * (4 if fp32 else base) for _, n, fp32 in self.outside_other)
        return total + self.buffer_bytes

    def total_bytes(self, weight_dtype: str) -> int:
        return sum(s.count * s.block_bytes(weight_dtype) for s in self.block_stacks()) + self.outside_bytes(weight_dtype)

    def parameters(self) -> int:
        """Parameter elements (PyTorch's count), as part_summary's `parameters`."""
        outside = sum(i * o + o for _, i, o, _ in self.outside_linears) + sum(n for _, n, _ in self.outside_other)
        return sum(s.count * s.block_parameters() for s in self.block_stacks()) + outside

    def max_linear_elements(self) -> int:
        return max(i * o for s in self.block_stacks() for _, i, o in s.linears)

    def block_linear_factors(self) -> int:
        """Sum of in + out over every block Linear of every stack (Adafactor's factored state)."""
        return sum(s.count * (i + o) for s in self.block_stacks() for _, i, o in s.linears)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Suffix name -> (in, out) of the Linear layers in a block, for LoRA targets."""
        return {name: (i, o) for name, i, o in self.block_linears}


def wan_transformer_sizes(config: dict[str, Any]) -> TransformerSizes:
    """The tensors of diffusers' WanTransformer3DModel for a config.json (defaults as its __init__)."""
    heads = int(config.get("num_attention_heads", 40))
    head_dim = int(config.get("attention_head_dim", 128))
    dim = heads * head_dim
    ffn = int(config.get("ffn_dim", 13824))
    text_dim = int(config.get("text_dim", 4096))
    freq_dim = int(config.get("freq_dim", 256))
    patch = tuple(int(v) for v in config.get("patch_size", (1, 2, 2)))
    in_channels = int(config.get("in_channels", 16))
    out_channels = int(config.get("out_channels") or in_channels)
    added_kv = config.get("added_kv_proj_dim")
    image_dim = config.get("image_dim")
    pos_len = config.get("pos_embed_seq_len")
    sizes = TransformerSizes(dict(config), int(config.get("num_layers", 40)), dim, heads, head_dim, ffn, text_dim,
                             patch, in_channels, out_channels)  # type: ignore[arg-type]
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            sizes.block_linears.append((f"{attn}.{proj}", dim, dim))
        sizes.block_other += [(f"{attn}.norm_q.weight", dim, False), (f"{attn}.norm_k.weight", dim, False)]
    if added_kv:
        sizes.block_linears += [("attn2.add_k_proj", int(added_kv), dim), ("attn2.add_v_proj", int(added_kv), dim)]
        sizes.block_other.append(("attn2.norm_added_k.weight", dim, False))
    sizes.block_linears += [("ffn.net.0.proj", dim, ffn), ("ffn.net.2", ffn, dim)]
    if config.get("cross_attn_norm", True):
        sizes.block_other += [("norm2.weight", dim, True), ("norm2.bias", dim, True)]
    sizes.block_other.append(("scale_shift_table", 6 * dim, True))

    kernel = math.prod(patch)
    sizes.outside_other += [("patch_embedding.weight", in_channels * dim * kernel, False), ("patch_embedding.bias", dim, False),
                            ("scale_shift_table", 2 * dim, True)]
    sizes.outside_linears += [
        ("condition_embedder.time_embedder.linear_1", freq_dim, dim, True),
        ("condition_embedder.time_embedder.linear_2", dim, dim, True),
        ("condition_embedder.time_proj", dim, 6 * dim, False),
        ("condition_embedder.text_embedder.linear_1", text_dim, dim, False),
        ("condition_embedder.text_embedder.linear_2", dim, dim, False),
        ("proj_out", dim, out_channels * kernel, False),
    ]
    if image_dim:
        image_dim = int(image_dim)
        sizes.outside_other += [("condition_embedder.image_embedder.norm1", 2 * image_dim, True),
                                ("condition_embedder.image_embedder.norm2", 2 * dim, True)]
        sizes.outside_linears += [("condition_embedder.image_embedder.ff.net.0.proj", image_dim, image_dim, False),
                                  ("condition_embedder.image_embedder.ff.net.2", image_dim, dim, False)]
        if pos_len:
            sizes.outside_other.append(("condition_embedder.image_embedder.pos_embed", int(pos_len) * image_dim, False))
    sizes.buffer_bytes = 2 * int(config.get("rope_max_seq_len", 1024)) * head_dim * 4  # freqs_cos, freqs_sin
    return sizes


def cogvideox_transformer_sizes(config: dict[str, Any]) -> TransformerSizes:
    """The tensors of diffusers' CogVideoXTransformer3DModel (0.42, transformer_cogvideox_3d.py) for a
    config.json, defaults as its __init__. Per block: norm1/norm2 (CogVideoXLayerNormZero: a Linear
    time_embed_dim -> 6 x dim and a LayerNorm), attn1 (to_q/k/v/out with bias, LayerNorm q/k per head),
    ff (GELU proj dim -> 4 dim, dim -> 4 dim back). Outside: patch_embed (Conv2d p x p, or a Linear of
    in x p x p x p_t when patch_size_t is set, the 1.5 models) and its text_proj, time_embedding
    (inner_dim -> time_embed_dim -> time_embed_dim), optional ofs_embedding, norm_final, norm_out
    (AdaLayerNorm), proj_out; the sincos positional table (a buffer, counted as float32) when the model
    has no rotary embeddings or learns its positions. No module is kept in float32. Text joins the video in one attention."""
    heads = int(config.get("num_attention_heads", 30))
    head_dim = int(config.get("attention_head_dim", 64))
    dim = heads * head_dim
    time_dim = int(config.get("time_embed_dim", 512))
    text_dim = int(config.get("text_embed_dim", 4096))
    p = int(config.get("patch_size", 2))
    p_t = config.get("patch_size_t")
    in_channels = int(config.get("in_channels", 16))
    out_channels = int(config.get("out_channels") or 16)
    text_len = int(config.get("max_text_seq_length", 226))
    affine = bool(config.get("norm_elementwise_affine", True))
    sizes = TransformerSizes(dict(config), int(config.get("num_layers", 30)), dim, heads, head_dim, 4 * dim, text_dim,
                             (int(p_t or 1), p, p), in_channels, out_channels, text_tokens=text_len, joint_text=True,
                             lora_defaults=("to_q", "to_k", "to_v", "to_out.0"))
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        sizes.block_linears.append((f"attn1.{proj}", dim, dim))
    sizes.block_linears += [("ff.net.0.proj", dim, 4 * dim), ("ff.net.2", 4 * dim, dim),
                            ("norm1.linear", time_dim, 6 * dim), ("norm2.linear", time_dim, 6 * dim)]
    if affine:
        sizes.block_other += [(f"{n}.{w}", dim, False) for n in ("norm1.norm", "norm2.norm") for w in ("weight", "bias")]
    sizes.block_other += [(f"attn1.{n}.{w}", head_dim, False) for n in ("norm_q", "norm_k") for w in ("weight", "bias")]

    if p_t is None:
        sizes.outside_other.append(("patch_embed.proj.weight", in_channels * dim * p * p, False))
        if config.get("patch_bias", True):
            sizes.outside_other.append(("patch_embed.proj.bias", dim, False))
        proj_out = p * p * out_channels
    else:  # diffusers builds this Linear with a bias whatever patch_bias says
        sizes.outside_linears.append(("patch_embed.proj", in_channels * p * p * int(p_t), dim, False))
        proj_out = p * p * int(p_t) * out_channels
    sizes.outside_linears += [("patch_embed.text_proj", text_dim, dim, False),
                              ("time_embedding.linear_1", dim, time_dim, False),
                              ("time_embedding.linear_2", time_dim, time_dim, False),
                              ("norm_out.linear", time_dim, 2 * dim, False), ("proj_out", dim, proj_out, False)]
    ofs = config.get("ofs_embed_dim")
    if ofs:
        sizes.outside_linears += [("ofs_embedding.linear_1", int(ofs), int(ofs), False),
                                  ("ofs_embedding.linear_2", int(ofs), int(ofs), False)]
    if affine:
        sizes.outside_other += [("norm_final", 2 * dim, False), ("norm_out.norm", 2 * dim, False)]
    if not config.get("use_rotary_positional_embeddings", False) or config.get("use_learned_positional_embeddings", False):
        frames = (int(config.get("sample_frames", 49)) - 1) // int(config.get("temporal_compression_ratio", 4)) + 1
        patches = (int(config.get("sample_height", 60)) // p) * (int(config.get("sample_width", 90)) // p) * frames
        sizes.buffer_bytes = (text_len + patches) * dim * 4
    return sizes


def hunyuan_video_transformer_sizes(config: dict[str, Any]) -> TransformerSizes:
    """The tensors of diffusers' HunyuanVideoTransformer3DModel (transformer_hunyuan_video.py) for a
    config.json, defaults as its __init__. Two stacks: num_layers dual-stream blocks (norm1 and
    norm1_context modulation Linears dim -> 6 dim; attention to_q/k/v/out and add_q/k/v/to_add_out
    with bias, RMSNorm q/k/added_q/added_k per head; ff and ff_context dim -> mlp_ratio dim -> dim)
    and num_single_layers single-stream blocks (norm.linear dim -> 3 dim; to_q/k/v, RMSNorm q/k;
    proj_mlp dim -> mlp dim; proj_out dim + mlp dim -> dim). Outside: the Conv3d patch embedding, the
    text embedder (context_embedder: its own time and text-pool embedders, proj_in, num_refiner_layers
    refiner blocks with LayerNorms, attention, a 4x feed-forward and an AdaNorm), the time, pooled-text
    and (guidance_embeds) guidance embedders, norm_out and proj_out. No buffers (rotary embeddings are
    computed per call), no module kept in float32. Text joins the video in one attention."""
    heads = int(config.get("num_attention_heads", 24))
    head_dim = int(config.get("attention_head_dim", 128))
    dim = heads * head_dim
    mlp = int(dim * float(config.get("mlp_ratio", 4.0)))
    text_dim = int(config.get("text_embed_dim", 4096))
    pooled = int(config.get("pooled_projection_dim", 768))
    p, p_t = int(config.get("patch_size", 2)), int(config.get("patch_size_t", 1))
    in_channels = int(config.get("in_channels", 16))
    out_channels = int(config.get("out_channels") or in_channels)
    qk_norm = config.get("qk_norm", "rms_norm") is not None
    dual_linears = [("norm1.linear", dim, 6 * dim), ("norm1_context.linear", dim, 6 * dim)]
    dual_linears += [(f"attn.{n}", dim, dim) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                                                        "to_out.0", "to_add_out")]
    dual_linears += [(f"{ff}.net.0.proj", dim, mlp) for ff in ("ff", "ff_context")]
    dual_linears += [(f"{ff}.net.2", mlp, dim) for ff in ("ff", "ff_context")]
    dual_other = [(f"attn.{n}.weight", head_dim, False) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")] if qk_norm else []
    single_linears = [("norm.linear", dim, 3 * dim), ("attn.to_q", dim, dim), ("attn.to_k", dim, dim), ("attn.to_v", dim, dim),
                      ("proj_mlp", dim, mlp), ("proj_out", dim + mlp, dim)]
    single_other = [(f"attn.{n}.weight", head_dim, False) for n in ("norm_q", "norm_k")] if qk_norm else []
    # The adapter's defaults: the attention projections of both stacks (finetrainers' target list).
    dual_lora = tuple(n for n, _, _ in dual_linears if n.startswith("attn."))
    single_lora = tuple(n for n, _, _ in single_linears if n.startswith("attn."))
    dual = BlockStack("transformer_blocks", int(config.get("num_layers", 20)), dual_linears, dual_other, dual_lora)
    single = BlockStack("single_transformer_blocks", int(config.get("num_single_layers", 40)), single_linears, single_other,
                        single_lora)
    sizes = TransformerSizes(dict(config), dual.count + single.count, dim, heads, head_dim, mlp, text_dim, (p_t, p, p),
                             in_channels, out_channels, block_linears=dual_linears, block_other=dual_other,
                             text_tokens=int(config.get("max_text_seq_length", 256)), joint_text=True,
                             lora_defaults=dual_lora + single_lora, stacks=[dual, single])

    kernel = p_t * p * p
    sizes.outside_other += [("x_embedder.proj.weight", in_channels * dim * kernel, False), ("x_embedder.proj.bias", dim, False)]
    refiner = "context_embedder.token_refiner.refiner_blocks"
    outside = [("context_embedder.time_text_embed.timestep_embedder.linear_1", 256, dim),
               ("context_embedder.time_text_embed.timestep_embedder.linear_2", dim, dim),
               ("context_embedder.time_text_embed.text_embedder.linear_1", text_dim, dim),
               ("context_embedder.time_text_embed.text_embedder.linear_2", dim, dim),
               ("context_embedder.proj_in", text_dim, dim),
               ("time_text_embed.timestep_embedder.linear_1", 256, dim), ("time_text_embed.timestep_embedder.linear_2", dim, dim),
               ("time_text_embed.text_embedder.linear_1", pooled, dim), ("time_text_embed.text_embedder.linear_2", dim, dim),
               ("norm_out.linear", dim, 2 * dim), ("proj_out", dim, kernel * out_channels)]
    if config.get("guidance_embeds", True):
        outside += [("time_text_embed.guidance_embedder.linear_1", 256, dim), ("time_text_embed.guidance_embedder.linear_2", dim, dim)]
    for i in range(int(config.get("num_refiner_layers", 2))):
        outside += [(f"{refiner}.{i}.attn.{n}", dim, dim) for n in ("to_q", "to_k", "to_v", "to_out.0")]
        outside += [(f"{refiner}.{i}.ff.net.0.proj", dim, 4 * dim), (f"{refiner}.{i}.ff.net.2", 4 * dim, dim),
                    (f"{refiner}.{i}.norm_out.linear", dim, 2 * dim)]
        sizes.outside_other += [(f"{refiner}.{i}.{n}", 2 * dim, False) for n in ("norm1", "norm2")]
    sizes.outside_linears += [(name, i, o, False) for name, i, o in outside]
    return sizes


def _swiglu_hidden(hidden: int, multiple_of: int = 256) -> int:
    """HiDreamImageFeedForwardSwiGLU's inner width: 2/3 of hidden_dim, rounded up to a multiple of 256."""
    inner = int(2 * hidden / 3)
    return multiple_of * ((inner + multiple_of - 1) // multiple_of)


def hidream_transformer_sizes(config: dict[str, Any]) -> TransformerSizes:
    """The tensors of diffusers' HiDreamImageTransformer2DModel (transformer_hidream_image.py) for a
    config.json, defaults as its __init__. Two stacks of HiDreamBlock wrappers (names under `block.`):
    num_layers dual-stream blocks (adaLN_modulation dim -> 12 dim; attn1 to_q/k/v/out and the text
    stream's to_q_t/k_t/v_t/out_t with bias, RMSNorms over dim for q, k, q_t, k_t; ff_i the MoE: shared
    experts SwiGLU(dim, 2 dim), num_routed_experts SwiGLU(dim, 4 dim) and the gate's (experts, dim)
    weight; ff_t a SwiGLU(dim, 4 dim); SwiGLU linears without bias) and num_single_layers single-stream
    blocks (adaLN dim -> 6 dim, attn1 to_q/k/v/out, RMSNorms q, k, ff_i the MoE). Without routed experts
    ff_i is one SwiGLU(dim, 4 dim). Outside: the patch embedding (Linear in * p * p -> dim), the time and
    pooled embedders (two Linears each), num_layers + num_single_layers + 1 caption projections
    without bias, and the final layer (Linear dim -> p * p * out, adaLN dim -> 2 dim). No buffers.
    Text (T5 128 + Llama 128 tokens, and each block's own Llama layer's 128) joins the image tokens
    in one attention."""
    heads = int(config.get("num_attention_heads", 20))
    head_dim = int(config.get("attention_head_dim", 128))
    dim = heads * head_dim
    p = int(config.get("patch_size") or 2)
    in_channels = int(config.get("in_channels", 64))
    out_channels = int(config.get("out_channels") or in_channels)
    captions = [int(c) for c in config.get("caption_channels") or [4096, 4096]]
    experts = int(config.get("num_routed_experts", 4))
    shared, routed = _swiglu_hidden(2 * dim), _swiglu_hidden(4 * dim)

    def swiglu(prefix: str, inner: int) -> list[tuple[str, int, int]]:
        return [(f"{prefix}.w1", dim, inner), (f"{prefix}.w2", inner, dim), (f"{prefix}.w3", dim, inner)]

    if experts > 0:
        moe = swiglu("block.ff_i.shared_experts", shared)
        for e in range(experts):
            moe += swiglu(f"block.ff_i.experts.{e}", routed)
        moe_other = [("block.ff_i.gate.weight", experts * dim, False)]
    else:
        moe, moe_other = swiglu("block.ff_i", routed), []
    attn = [(f"block.attn1.{n}", dim, dim) for n in ("to_q", "to_k", "to_v", "to_out")]
    attn_t = [(f"block.attn1.{n}_t", dim, dim) for n in ("to_q", "to_k", "to_v", "to_out")]
    norms = [(f"block.attn1.{n}.weight", dim, False) for n in ("q_rms_norm", "k_rms_norm")]
    norms_t = [(f"block.attn1.{n}_t.weight", dim, False) for n in ("q_rms_norm", "k_rms_norm")]
    ff_t = swiglu("block.ff_t", routed)
    dual_linears = [("block.adaLN_modulation.1", dim, 12 * dim), *attn, *attn_t, *moe, *ff_t]
    single_linears = [("block.adaLN_modulation.1", dim, 6 * dim), *attn, *moe]

    def unbiased(linears: list[tuple[str, int, int]]) -> frozenset[str]:
        return frozenset(name for name, _, _ in linears if name.rsplit(".", 1)[-1] in ("w1", "w2", "w3"))

    # The adapter's defaults: the image stream's attention projections of both stacks.
    lora = tuple(n for n, _, _ in attn)
    dual = BlockStack("double_stream_blocks", int(config.get("num_layers", 16)), dual_linears,
                      norms + norms_t + moe_other, lora, unbiased(dual_linears))
    single = BlockStack("single_stream_blocks", int(config.get("num_single_layers", 32)), single_linears,
                        norms + moe_other, lora, unbiased(single_linears))
    sizes = TransformerSizes(dict(config), dual.count + single.count, dim, heads, head_dim, routed, captions[1], (1, p, p),
                             in_channels, out_channels, block_linears=dual_linears, block_other=dual.other,
                             text_tokens=3 * 128, joint_text=True, lora_defaults=lora, stacks=[dual, single])
    text_emb = int(config.get("text_emb_dim", 2048))
    outside = [("x_embedder.proj", in_channels * p * p, dim),
               ("t_embedder.timestep_embedder.linear_1", 256, dim), ("t_embedder.timestep_embedder.linear_2", dim, dim),
               ("p_embedder.pooled_embedder.linear_1", text_emb, dim), ("p_embedder.pooled_embedder.linear_2", dim, dim),
               ("final_layer.linear", dim, p * p * out_channels), ("final_layer.adaLN_modulation.1", dim, 2 * dim)]
    sizes.outside_linears += [(name, i, o, False) for name, i, o in outside]
    projections = [captions[1]] * (dual.count + single.count) + [captions[0]]
    sizes.outside_other += [(f"caption_projection.{i}.linear.weight", c * dim, False) for i, c in enumerate(projections)]
    return sizes


# A denoiser's config.json names its class (_class_name, as diffusers writes it); the built-in
# configs of known_models.py name none and are Wan's.
TRANSFORMER_SIZES = {"WanTransformer3DModel": wan_transformer_sizes,
                     "CogVideoXTransformer3DModel": cogvideox_transformer_sizes,
                     "HunyuanVideoTransformer3DModel": hunyuan_video_transformer_sizes,
                     "HiDreamImageTransformer2DModel": hidream_transformer_sizes}


# Denoisers of still images: a sample is one frame, whatever `frames` says (the adapter's FrameRule.still()).
IMAGE_TRANSFORMERS = frozenset({"HiDreamImageTransformer2DModel"})


def transformer_class(config: dict[str, Any]) -> str:
    """The diffusers class a denoiser's config describes (the built-in configs without one are Wan's)."""
    return str(config.get("_class_name") or "WanTransformer3DModel")


def transformer_sizes(config: dict[str, Any]) -> TransformerSizes:
    """The tensors of the denoiser a config.json describes, by the class it names."""
    name = transformer_class(config)
    if name not in TRANSFORMER_SIZES:
        # A user's answer, not a crash: the model trains, only its memory cannot be estimated yet.
        from core.errors import ConfigError

        raise ConfigError(f"the VRAM estimate has no size table for {name} yet (it knows {', '.join(TRANSFORMER_SIZES)}); "
                          "the model trains, but its memory is not estimated: try a short run and watch the memory plot",
                          key="base_model")
    return TRANSFORMER_SIZES[name](config)


def block_activation_bytes(t: TransformerSizes, tokens: int, text_tokens: int, b: int, *, lora_rank: int = 0,
                           per_token_timesteps: bool = False) -> int:
    """Bytes autograd saves in one Wan block's forward for one sample (compute dtype of b bytes).

    Counted from the tensors diffusers' WanTransformerBlock saves (torch 2.13, with a LoRA on the
    family's default targets, flash-style attention that saves q, k, v, out and the logsumexp):
    per token x width 6 float32 tensors and 13 in the compute dtype (9 in float32 training, where
    some .float() copies are the tensor itself); 2 per token x ffn_dim; 4-5 per text token x width;
    norm statistics per token; the LoRA's rank-r intermediates; the per-token timestep projection
    of Wan 2.2 TI2V-5B adds 8 float32 tensors per token x width.
    """
    L, T, D, F = tokens, text_tokens, t.dim, t.ffn_dim
    per_token_width = 24 + (13 * b if b < 4 else 36)
    total = L * D * per_token_width + L * F * 2 * b + T * D * (4 + 4 * b if b < 4 else 16)
    total += L * t.heads * 8 + L * 36 + T * 4 + D * 12
    if per_token_timesteps:
        total += L * D * 32
    if lora_rank:
        total += lora_rank * b * (8 * L + 2 * T)
    return total


@dataclass
class TextEncoderSizes:
    """A T5-family encoder (UMT5EncoderModel, T5EncoderModel) from its config.json."""

    d_model: int
    d_ff: int
    d_kv: int
    heads: int
    layers: int
    vocab: int
    buckets: int
    gated: bool
    bias_layers: int = 0  # layers with a relative-position table: all in UMT5, the first only in T5

    def parameters(self) -> int:
        inner = self.heads * self.d_kv
        per_layer = 4 * self.d_model * inner + 2 * self.d_model
        per_layer += (3 if self.gated else 2) * self.d_model * self.d_ff
        return self.vocab * self.d_model + self.layers * per_layer + self.bias_layers * self.buckets * self.heads + self.d_model

    def weight_bytes(self, weight_dtype: str) -> int:
        # Linear layers without bias; quantized types keep the embedding and norms in bfloat16.
        if weight_dtype in DTYPE_BYTES:
            return self.parameters() * DTYPE_BYTES[weight_dtype]
        inner = self.heads * self.d_kv
        linears = [(self.d_model, inner)] * 4 + [(self.d_model, self.d_ff)] * (2 if self.gated else 1) + [(self.d_ff, self.d_model)]
        per_layer = sum(linear_bytes(i, o, False, weight_dtype) for i, o in linears)
        other = 2 * self.d_model * 2
        return self.layers * (per_layer + other) + (self.bias_layers * self.buckets * self.heads + self.vocab * self.d_model + self.d_model) * 2


def text_encoder_sizes(config: dict[str, Any]) -> TextEncoderSizes:
    """A T5-family encoder's layout; a decoder's config (Llama, a Llava's language model) is read by
    its own key names into the same layout, for the activation terms (its exact size: part_sizes)."""
    if config.get("model_type") == "llava":
        config = config.get("text_config", {})
    feed_forward = str(config.get("feed_forward_proj", "gated-gelu"))
    d_model = int(config.get("d_model", config.get("hidden_size", 4096)))
    heads = int(config.get("num_heads", config.get("num_attention_heads", 64)))
    d_kv = int(config.get("d_kv", config.get("head_dim") or (d_model // heads if "hidden_size" in config else 64)))
    return TextEncoderSizes(
        d_model=d_model, d_ff=int(config.get("d_ff", config.get("intermediate_size", 10240))), d_kv=d_kv,
        heads=heads, layers=int(config.get("num_layers", config.get("num_hidden_layers", 24))),
        vocab=int(config.get("vocab_size", 256384)), buckets=int(config.get("relative_attention_num_buckets", 32)),
        gated=feed_forward.startswith("gated") or bool(config.get("is_gated_act", False)),
        bias_layers=1 if config.get("model_type") == "t5" else int(config.get("num_layers", 24)),
    )


def text_encoder_activation_bytes(config: dict[str, Any], tokens: int, b: int) -> int:
    """Bytes a T5-family encoder saves for one caption (all layers; it is not checkpointed):
    per layer 4 q/k/v/out, 6 gated feed-forward, ~15 bytes per token x width, and one position bias
    of heads x tokens^2 (from the tensors UMT5EncoderModel saves, torch 2.13)."""
    te = text_encoder_sizes(config)
    per_layer = tokens * (4 * te.heads * te.d_kv * b + 6 * te.d_ff * b + 15 * te.d_model) + te.heads * tokens**2 * b
    return te.layers * (per_layer + 4 * te.heads * tokens + 10 * tokens)
