"""HiDream's text path, as HiDreamImagePipeline.encode_prompt (core/models/hidream.py's docstring has
what each encoder gives): the CLIPs' pooled vectors and T5's states, which the text cache holds, and
the Llama's kept layers, cached as well unless text_encoder_4.keep_loaded keeps the Llama loaded to
encode each batch during training (then `encode_llama` runs per batch, without a graph)."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# HiDreamImagePipeline.__call__'s max_sequence_length; _get_clip_prompt_embeds caps CLIP at 218.
MAX_TEXT_LENGTH = 128
CLIP_CAP = 218
LLAMA = "text_encoder_4"


def encode_clips_and_t5(parts: dict[str, tuple[Any, Any]], captions: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """{"t5_embeds": (B, L, D), "pooled_embeds": (B, D1 + D2)} from text_encoder .. text_encoder_3."""
    import torch

    pooled = []
    for name in ("text_encoder", "text_encoder_2"):
        tokenizer, clip = parts[name]
        ids = tokenizer(captions, padding="max_length", max_length=min(max_length, CLIP_CAP),
                        truncation=True, return_tensors="pt").input_ids
        pooled.append(clip(ids.to(next(clip.parameters()).device), output_hidden_states=False)[0])
    t5_tokenizer, t5 = parts["text_encoder_3"]
    inputs = t5_tokenizer(captions, padding="max_length", max_length=min(max_length, t5_tokenizer.model_max_length),
                          truncation=True, add_special_tokens=True, return_tensors="pt")
    device = next(t5.parameters()).device
    t5_embeds = t5(inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device))[0]
    return {"t5_embeds": t5_embeds, "pooled_embeds": torch.cat([p.to(device) for p in pooled], dim=-1)}


def encode_llama(part: tuple[Any, Any], captions: list[str], max_length: int, layers: list[int]) -> torch.Tensor:
    """(B, len(layers), L, D): the outputs of the decoder layers the transformer reads, ascending."""
    import torch

    tokenizer, llama = part
    inputs = tokenizer(captions, padding="max_length", max_length=min(max_length, tokenizer.model_max_length),
                       truncation=True, add_special_tokens=True, return_tensors="pt")
    device = next(llama.parameters()).device
    hidden = llama(inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device),
                   output_hidden_states=True).hidden_states
    # hidden_states[0] is the token embedding; the pipeline's stack starts at hidden_states[1].
    return torch.stack([hidden[k + 1] for k in layers], dim=1)


@lru_cache(maxsize=1)
def llama_decoder_class() -> type:
    """transformers' LlamaModel, told that the folder's LlamaForCausalLM checkpoint also holds the LM head
    it does not load (else every load prints an "UNEXPECTED lm_head.weight" report)."""
    from transformers import LlamaModel

    class LlamaDecoder(LlamaModel):
        _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # noqa: RUF012 (transformers' own attribute)

    return LlamaDecoder
