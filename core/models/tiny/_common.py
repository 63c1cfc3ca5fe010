"""Helpers shared by the family builders: seeding, and saving a pipeline the way the hub does."""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# transformers 5 merged the slow and fast tokenizers: T5TokenizerFast is T5Tokenizer, and
# PreTrainedTokenizerFast is TokenizersBackend. save_pretrained() records the 5.x names; the
# hub's repos (and transformers 4.x) use the fast names, which 5.x still exports as aliases.
_PORTABLE_CLASS_NAMES = {
    "T5Tokenizer": "T5TokenizerFast",
    "CLIPTokenizer": "CLIPTokenizerFast",
    "LlamaTokenizer": "LlamaTokenizerFast",
    "TokenizersBackend": "PreTrainedTokenizerFast",
}


def seed_for(seed: int, component: str) -> None:
    """Seed torch for one component: each gets its own stream, the same for every run with this seed."""
    import torch

    # crc32 rather than hash(): str hashes change from one Python process to the next.
    torch.manual_seed((seed * 1_000_003 + zlib.crc32(component.encode())) % 2**63)


def save_pipeline(pipe: Any, out: Path) -> None:
    """Save the pipeline (model_index.json + one subfolder per component) as safetensors."""
    from transformers.utils import logging as hf_logging

    # transformers draws a progress bar per text encoder ("Writing model shards"): noise for files this small.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    for value in index.values():
        if isinstance(value, list) and len(value) == 2 and value[0] == "transformers":
            value[1] = _PORTABLE_CLASS_NAMES.get(value[1], value[1])
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for config_path in out.glob("*/tokenizer_config.json"):
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") in _PORTABLE_CLASS_NAMES:
            config["tokenizer_class"] = _PORTABLE_CLASS_NAMES[config["tokenizer_class"]]
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def vocab_size_for(tokenizer: Any) -> int:
    """Embedding rows for a tokenizer: every id it can produce, rounded up to a multiple of 8."""
    n = len(tokenizer)
    return (n + 7) // 8 * 8


def tiny_t5_encoder(seed: int, component: str, tokenizer: Any, d_model: int) -> Any:
    """A tiny T5 v1.1 encoder (gated-GELU, as t5-v1_1-xxl) sized for the tokenizer, seeded for component."""
    from transformers import T5Config, T5EncoderModel

    seed_for(seed, component)
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size_for(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    ).eval()
