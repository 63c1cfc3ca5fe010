"""Where things are in a HiDream model: the Linear layers each part stores quantized, the block stacks
and the default LoRA targets, and the training-mode output's patch layout (core/models/hidream.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from core.memory.quantize import LayerFilter

# The transformer's two stacks, in the order its forward runs them (each block a HiDreamBlock wrapper).
STACKS = ("double_stream_blocks", "single_stream_blocks")
# diffusers' train_dreambooth_lora_hidream.py's default target_modules ["to_k", "to_q", "to_v", "to_out"]:
# the attention projections of the image stream in both stacks (in the single-stream blocks the text
# tokens pass the same projections). Not the text stream's to_q_t/.../to_out_t, the experts (w1, w2, w3)
# or the modulation; HiDream-E1's own LoRA adds the _t projections and the experts' w1/w2/w3, and
# lora.target_layers can add them here.
LORA_TARGETS = ("block.attn1.to_q", "block.attn1.to_k", "block.attn1.to_v", "block.attn1.to_out")


def layer_filter(family: str, part: str, weight_dtype: str) -> LayerFilter:
    """The Linear layers of a model part that a quantized weight_dtype stores quantized (HiDreamAdapter.quantize_filter)."""
    from core.memory.quantize import LayerFilter

    if part in ("text_encoder", "text_encoder_2"):
        return LayerFilter(family, part, r"(text_model\.)?encoder\.layers\.\d+\..+", setting=f"{part}.weight_dtype")
    if part == "text_encoder_3":
        # T5: every Linear, without the feed-forward output (wo) for NFLOAT_4, as Wan's and CogVideoX's T5.
        return LayerFilter(family, part, r".+", exclude=r".+\.wo" if weight_dtype == "NFLOAT_4" else None,
                           setting="text_encoder_3.weight_dtype")
    if part == "text_encoder_4":
        # Every Linear of Llama's decoder layers; the token embedding and the norms stay.
        return LayerFilter(family, part, r"layers\.\d+\..+", setting="text_encoder_4.weight_dtype")
    if part != "transformer":
        raise ValueError(f"{family} has no quantizable part {part!r}")
    # Every Linear inside both stacks (attention, the shared and routed experts, the blocks'
    # adaLN modulation). The patch, time and pooled embedders, the caption projections and the
    # final layer stay in the compute dtype, as do all norms and the gates' weights (Parameters).
    return LayerFilter(family, part, r"(double|single)_stream_blocks\.\d+\..+", setting="transformer.weight_dtype")


def unpatchify_training_output(out: torch.Tensor, rows: int, cols: int, patch: int) -> torch.Tensor:
    """The transformer's training-mode output (B, C, S, p*p), S image tokens (padded to max_seq for a
    non-square image), as its eval-mode output (B, C, rows * p, cols * p): token s is patch (s // cols,
    s % cols), its p*p values in (row, column) order, as HiDreamImageTransformer2DModel.patchify lays them."""
    b, c = out.shape[:2]
    grid = out[:, :, : rows * cols].reshape(b, c, rows, cols, patch, patch)
    return grid.permute(0, 1, 2, 4, 3, 5).reshape(b, c, rows * patch, cols * patch)
