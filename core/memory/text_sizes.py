"""Sizes of the text encoders after the first (text_encoder_2 ...), from their config files alone:
what the estimate counts of one whose section keeps it loaded (keep_loaded: its weights on the GPU
through the steps) or, cached, what the text cache holds of it per caption.

Sized here: a Llama decoder (config model_type "llama"), loaded as transformers' LlamaModel without
its LM head: the token embedding, per layer q/k/v/o (grouped-query: k and v of num_key_value_heads x
head_dim), the SwiGLU gate/up/down and two RMSNorms, and the final norm, no biases. Quantized, its
decoder layers' Linears are stored quantized (the adapters' filter `layers\\.\\d+\\..+`) and the
embedding and norms stay in the compute dtype (bfloat16).

What a transformer that reads several of a decoder's layers (its config's `llama_layers`) caches of
it: each distinct layer's output, CONDITION_TOKENS x hidden_size, in the encoder's compute dtype.
"""

from __future__ import annotations

from typing import Any

from .model_sizes import DTYPE_BYTES, compute_bytes, linear_bytes

# The text length such a pipeline pads its conditions to (its max_sequence_length).
CONDITION_TOKENS = 128


def _decoder_shape(config: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads") or heads)
    return hidden, heads * head_dim, kv * head_dim, int(config["intermediate_size"]), int(config["num_hidden_layers"]), int(config["vocab_size"])


def _decoder_linears(config: dict[str, Any]) -> list[tuple[int, int]]:
    hidden, q, kv, inner, _, _ = _decoder_shape(config)
    return [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inner), (hidden, inner), (inner, hidden)]


def decoder_parameters(config: dict[str, Any]) -> int:
    hidden, _, _, _, layers, vocab = _decoder_shape(config)
    per_layer = sum(i * o for i, o in _decoder_linears(config)) + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden


def text_encoder_weight_bytes(config: dict[str, Any], weight_dtype: str) -> int | None:
    """Bytes of the encoder's weights and buffers stored as weight_dtype; None for an encoder not sized here."""
    if config.get("model_type") != "llama":
        return None
    hidden, _, _, _, layers, vocab = _decoder_shape(config)
    # The rotary embedding's inv_freq and original_inv_freq buffers: head_dim / 2 float32 values each.
    heads = int(config["num_attention_heads"])
    rotary = 2 * (int(config.get("head_dim") or hidden // heads) // 2) * 4
    if weight_dtype in DTYPE_BYTES:
        return decoder_parameters(config) * DTYPE_BYTES[weight_dtype] + rotary
    per_layer = sum(linear_bytes(i, o, False, weight_dtype) for i, o in _decoder_linears(config))
    base = compute_bytes(weight_dtype)
    return layers * (per_layer + 2 * hidden * base) + (vocab * hidden + hidden) * base + rotary


def cached_condition_bytes(transformer_config: dict[str, Any], config: dict[str, Any], weight_dtype: str) -> int | None:
    """Bytes per caption the text cache holds of this encoder's outputs; None where not sized here."""
    layers = transformer_config.get("llama_layers")
    if config.get("model_type") != "llama" or not layers:
        return None
    return len(set(layers)) * CONDITION_TOKENS * int(config["hidden_size"]) * compute_bytes(weight_dtype)
