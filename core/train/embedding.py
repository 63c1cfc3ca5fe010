"""Textual inversion (training_method EMBEDDING): new placeholder tokens with trainable embedding rows.

add_placeholder_tokens() adds each placeholder to the tokenizer as one new token id and swaps the
text encoder's input embedding (a T5 encoder's `shared`, shared with `encoder.embed_tokens`) for a
PlaceholderLookup: old ids read the original, frozen table; the new ids read a small float32
(n, D) Parameter. Only that Parameter trains. The original table is neither copied nor resized,
so it stays bit-identical and memory does not grow by a vocabulary's worth of rows; new ids may
lie past the table's end (or in the rows real checkpoints pad the vocabulary with).

Trainer integration (captions with a placeholder are not served from the text cache):
- optimizer: `placeholders.parameters()` at embedding_learning_rate; the text encoder stays frozen;
- each step: `live = encode_captions_live(adapter, captions, placeholders)` (runs encode_text with
  grad=True for the captions that contain a placeholder), then `merge_live_embeddings(batch, live,
  adapter.condition_layout())` puts those rows into every condition key of the batch, each on its
  own pad axis; the loss then reaches the rows;
- backups: `placeholders.state_dict()` / `load_state_dict()`; output: core.export.embedding, read back
  into a tokenizer and text encoder by load_embedding();
- cleanup: `placeholders.remove()` restores the original module and tokenizer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from core.errors import ConfigError, UserError
from core.models.conditions import TEXT_LAYOUT, ConditionSpec, pad_axis_to, used_length

logger = logging.getLogger(__name__)

TOKENS_KEY = "embedding.placeholder_tokens"
WORDS_KEY = "embedding.initializer_words"


class PlaceholderLookup(nn.Module):
    """Stands in for an nn.Embedding: the frozen `base` table for old ids, trainable rows for new ones."""

    def __init__(self, base: nn.Module, token_ids: Sequence[int], rows: nn.Parameter) -> None:
        super().__init__()
        self.base = base
        self.token_ids = list(token_ids)
        # Kept out of the module's registry on purpose: text_encoder.to(bfloat16) or requires_grad_(False)
        # must not cast or freeze the float32 rows the optimizer holds; forward moves/casts a view.
        object.__setattr__(self, "_rows", rows)

    @property
    def weight(self) -> torch.Tensor:  # what callers of get_input_embeddings().weight expect
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return int(self.base.weight.shape[1])

    @property
    def num_embeddings(self) -> int:
        return int(self.base.weight.shape[0])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        new_ids = torch.tensor(self.token_ids, device=input_ids.device, dtype=input_ids.dtype)
        match = input_ids.unsqueeze(-1) == new_ids  # (..., n)
        is_new = match.any(-1)
        # New ids may lie past the table's end: look up id 0 for them, then overwrite those positions.
        out = self.base(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        rows = self._rows.to(device=out.device, dtype=out.dtype)  # differentiable cast to the table's dtype
        picked = rows[match.to(torch.int64).argmax(-1)]
        return torch.where(is_new.unsqueeze(-1), picked, out)


class PlaceholderEmbeddings:
    """The placeholder tokens installed in one tokenizer + text encoder, and their trainable rows."""

    def __init__(self, tokenizer: Any, text_encoder: Any, tokens: list[str], token_ids: list[int],
                 rows: nn.Parameter, original: nn.Module, tokenizer_snapshot: str | None) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokens = list(tokens)
        self.token_ids = list(token_ids)
        self.rows = rows
        self._original = original
        self._tokenizer_snapshot = tokenizer_snapshot
        self._removed = False

    def parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer trains: the (n, D) float32 rows, nothing of the encoder."""
        yield self.rows

    def vectors(self) -> dict[str, torch.Tensor]:
        """{token: (D,) float32 vector} on the CPU, detached: what an embedding file holds."""
        return {t: self.rows[i].detach().float().cpu().clone() for i, t in enumerate(self.tokens)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.vectors()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Set the rows in place (the optimizer keeps holding the same Parameter)."""
        if set(state) != set(self.tokens):
            raise ValueError(f"embedding state holds tokens {sorted(state)}, expected {sorted(self.tokens)}")
        with torch.no_grad():
            for i, token in enumerate(self.tokens):
                vector = state[token].reshape(-1)
                if vector.shape[0] != self.rows.shape[1]:
                    raise ValueError(f"vector of {token} has {vector.shape[0]} values, the text encoder needs {self.rows.shape[1]}")
                self.rows[i].copy_(vector.to(self.rows))

    def contains_placeholder(self, caption: str) -> bool:
        # Added tokens match as substrings, so a substring test is what the tokenizer will see.
        return any(token in caption for token in self.tokens)

    def remove(self) -> None:
        """Put the original embedding module and tokenizer back (the last installed is removed first)."""
        if self._removed:
            return
        if self.text_encoder.get_input_embeddings() is not self._lookup_module():
            logger.warning("the text encoder's input embedding was replaced since the placeholders were added")
        self.text_encoder.set_input_embeddings(self._original)
        if self._tokenizer_snapshot is not None:
            from tokenizers import Tokenizer

            self.tokenizer._tokenizer = Tokenizer.from_str(self._tokenizer_snapshot)
        self._removed = True

    def _lookup_module(self) -> nn.Module | None:
        module = self.text_encoder.get_input_embeddings()
        return module if isinstance(module, PlaceholderLookup) and module._rows is self.rows else None


def _config_error(message: str, key: str) -> ConfigError:
    return ConfigError(message, key=key)


def _check_new_token(tokenizer: Any, token: str, clean_caption: Callable[[str], str] | None) -> None:
    if not token.strip() or any(ch.isspace() for ch in token):
        raise _config_error(f"placeholder token {token!r} must be one word without spaces, such as <concept>", TOKENS_KEY)
    if clean_caption is not None and clean_caption(token) != token:
        raise _config_error(f"placeholder token {token!r} is changed by caption cleaning; use plain characters, such as <concept>", TOKENS_KEY)
    vocab = tokenizer.get_vocab()
    if token in vocab or f"\u2581{token}" in vocab:  # \u2581: SentencePiece's word-start mark
        raise _config_error(
            f"placeholder token {token!r} is already a word of the tokenizer; pick a new string, such as <{token}-concept>",
            TOKENS_KEY,
        )


def _word_vector(tokenizer: Any, table: torch.Tensor, word: str) -> torch.Tensor:
    """Mean of the word's token embeddings, without special tokens or bare word-start pieces."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids)
    ids = [i for i in ids if i not in special and i < table.shape[0]]
    # A lone "▁" piece marks a word start in every split word; it would pull all initialisations together.
    meaningful = [i for i in ids if tokenizer.decode([i]).strip()]
    ids = meaningful or ids
    if not ids:
        raise _config_error(f"initializer word {word!r} gives no tokens; use an ordinary word such as 'person'", WORDS_KEY)
    return table[ids].float().mean(dim=0)


def _initializer_words(tokens: list[str], words: Sequence[str]) -> list[str]:
    words = list(words)
    if len(words) == 1:
        return words * len(tokens)
    if len(words) != len(tokens):
        raise _config_error(
            f"{len(words)} initializer words for {len(tokens)} placeholder tokens; give one word per token, or one for all",
            WORDS_KEY,
        )
    return words


def add_placeholder_tokens(tokenizer: Any, text_encoder: Any, placeholder_tokens: Sequence[str],
                           initializer_words: Sequence[str],
                           clean_caption: Callable[[str], str] | None = None) -> PlaceholderEmbeddings:
    """Add the tokens, with rows initialised from the initializer words' embeddings (see module doc).
    clean_caption: the family's caption cleaning (ModelAdapter.clean_caption); a token it would
    change could never be matched in a cleaned caption, so it is refused."""
    tokens = list(placeholder_tokens)
    if not tokens:
        raise _config_error("no placeholder tokens; give at least one, such as <concept>", TOKENS_KEY)
    words = _initializer_words(tokens, initializer_words)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        init = torch.stack([_word_vector(tokenizer, table, w) for w in words])
    return install_placeholders(tokenizer, text_encoder, tokens, init, clean_caption)


def install_placeholders(tokenizer: Any, text_encoder: Any, tokens: Sequence[str], vectors: torch.Tensor,
                         clean_caption: Callable[[str], str] | None = None) -> PlaceholderEmbeddings:
    """Add tokens as single new ids and swap in a PlaceholderLookup whose rows start as `vectors` (n, D)."""
    tokens = list(tokens)
    if len(set(tokens)) != len(tokens):
        raise _config_error(f"placeholder tokens {tokens} repeat a token; give each once", TOKENS_KEY)
    for token in tokens:
        _check_new_token(tokenizer, token, clean_caption)
    original = text_encoder.get_input_embeddings()
    table = original.weight
    if vectors.shape != (len(tokens), table.shape[1]):
        raise ValueError(f"expected ({len(tokens)}, {table.shape[1]}) vectors, got {tuple(vectors.shape)}")
    backend = getattr(tokenizer, "_tokenizer", None)
    snapshot = backend.to_str() if backend is not None and hasattr(backend, "to_str") else None
    before = len(tokenizer)
    tokenizer.add_tokens(tokens)  # as diffusers' load_textual_inversion adds them: same ids, same matching
    token_ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    rows = nn.Parameter(vectors.detach().to(device=table.device, dtype=torch.float32).clone())
    placeholders = PlaceholderEmbeddings(tokenizer, text_encoder, tokens, token_ids, rows, original, snapshot)
    try:
        for token, token_id in zip(tokens, token_ids):
            # Exactly one new id, also when the token touches other text (as in "<concept>,").
            seen = tokenizer(f"a {token}, {token}x", add_special_tokens=False).input_ids
            if token_id < before or seen.count(token_id) != 2:
                raise _config_error(f"placeholder token {token!r} does not stay one token; use a form such as <concept>", TOKENS_KEY)
    except ConfigError:
        if snapshot is not None:
            from tokenizers import Tokenizer

            tokenizer._tokenizer = Tokenizer.from_str(snapshot)
        raise
    text_encoder.set_input_embeddings(PlaceholderLookup(original, token_ids, rows))
    logger.info("placeholder tokens %s added as ids %s", tokens, token_ids)
    return placeholders


def check_captions_hold_placeholders(config: dict[str, Any], captions: Sequence[str], folders: Sequence[str]) -> None:
    """Refuse an EMBEDDING run in which some placeholder token is in no training caption.

    A token's row learns only from captions that hold it: without any, the run would train nothing
    for it (and, with no placeholder at all, stop at the first step because no loss depends on
    the rows). Matched as the tokenizer matches added tokens: as a substring.
    """
    if config["training_method"] != "EMBEDDING":
        return
    for token in config["embedding"]["placeholder_tokens"]:
        if not any(token in caption for caption in captions):
            where = ", ".join(folders) or "the datasets"
            raise _config_error(
                f"{TOKENS_KEY}: no training caption holds the placeholder {token!r} ({len(captions)} captions in {where}); "
                f"write it in the captions where the concept appears, such as 'a video of {token} walking', "
                "or set embedding.placeholder_tokens to the token the captions use",
                TOKENS_KEY,
            )


def encode_captions_live(adapter: Any, captions: Sequence[str], placeholders: PlaceholderEmbeddings) -> dict[str, Any]:
    """Encode, with autograd, the captions that contain a placeholder (the tokens are the same in
    every encoder that has them, so one encoder's placeholders tell).

    Returns {"indices": [batch row, ...], **encode_text's keys (k, ...)}; with no placeholder
    caption, {"indices": []} (nothing to merge).
    """
    indices = [i for i, caption in enumerate(captions) if placeholders.contains_placeholder(caption)]
    if not indices:
        return {"indices": []}
    encoded = adapter.encode_text([captions[i] for i in indices], grad=True)
    return {"indices": indices, **encoded}


def merge_live_embeddings(batch: Mapping[str, Any], live: Mapping[str, Any],
                          layout: Mapping[str, ConditionSpec] | None = None) -> dict[str, Any]:
    """A copy of batch with the live rows in each condition key (out of place, so grads flow).

    layout: the adapter's condition_layout() (by default one encoder's prompt_embeds and
    prompt_mask). Live tensors are cast to the batch's dtype and device. A padded key is padded
    with its pad value or trimmed to the batch's length on its own axis; when a live caption uses
    more of that axis than the batch holds, the batch is widened with the pad value instead (never
    cutting tokens). A fixed-size key is copied in as it is.
    """
    out = dict(batch)
    indices = list(live.get("indices") or [])
    if not indices:
        return out
    for name, spec in (TEXT_LAYOUT if layout is None else layout).items():
        old = batch[name]
        new = live[name].to(device=old.device, dtype=old.dtype)
        if spec.pad_axis is not None:
            dim = spec.pad_axis + 1  # the batch's axis
            needed = used_length(new, dim, spec.pad_value)
            if needed > old.shape[dim]:
                old = pad_axis_to(old, dim, needed, spec.pad_value)
            new = pad_axis_to(new, dim, old.shape[dim], spec.pad_value)
        out[name] = old.index_copy(0, torch.tensor(indices, device=old.device), new)
    return out


def load_embedding(path: str | os.PathLike, tokenizer: Any, text_encoder: Any) -> PlaceholderEmbeddings:
    """Add the file's tokens to tokenizer + text_encoder with the file's vectors (sampling, resuming)."""
    from core.export.embedding import read_embedding

    vectors, _ = read_embedding(path)
    width = int(text_encoder.get_input_embeddings().weight.shape[1])
    for token, vector in vectors.items():
        if vector.shape[0] != width:
            raise UserError(
                f"{path}: {token!r} has {vector.shape[0]} values but this text encoder's embeddings have {width}; "
                "the embedding was trained for another model"
            )
    return install_placeholders(tokenizer, text_encoder, list(vectors), torch.stack(list(vectors.values())))
