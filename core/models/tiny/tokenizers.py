"""Tokenizers built offline for the tiny models.

Each tokenizer's vocabulary is learnt in memory from a small built-in corpus of video captions,
split by the same normalizer and pre-tokenizer (from the `tokenizers` library) that the real
model's transformers class uses, then handed to that class as vocab (+ merges). This matters in
transformers 5: T5Tokenizer, CLIPTokenizer and LlamaTokenizer rebuild their normalizer and
pre-tokenizer themselves when loaded and keep only vocab/merges from tokenizer.json.

The merges are learnt by a small pure-Python BPE with a fixed tie-break instead of the
`tokenizers` trainers: those are not reproducible (BPE breaks ties in hash order, Unigram's
float sums vary), and the same seed must give the same folder.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import (
        CLIPTokenizer,
        LlamaTokenizer,
        PreTrainedTokenizerFast,
        T5Tokenizer,
    )

logger = logging.getLogger(__name__)

_COLORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "gray", "golden")
_SUBJECTS = (
    "square", "circle", "ball", "cat", "dog", "car", "bird", "person", "woman", "man",
    "tree", "boat", "horse", "robot", "flower", "train",
)
_MOTIONS = (
    "moving left across", "moving right across", "bouncing on", "rotating slowly over",
    "walking through", "running along", "floating above", "falling onto", "jumping over",
    "dancing in front of", "spinning around", "sliding down",
)
_SCENES = (
    "a blue background", "a white wall", "a green field", "a city street", "a sandy beach",
    "a dark room", "a snowy mountain", "a calm lake", "a busy kitchen", "a forest at night",
    "the ocean", "a wooden table",
)
_EXTRA = (
    "The camera pans slowly from left to right while the light changes.",
    "A close-up shot with a shallow depth of field and soft natural light.",
    "Wide angle view, the camera zooms in, cinematic style, high quality video.",
    "Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality.",
    "JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands and faces.",
    "A cat and a dog baking a cake together in a kitchen, sunlight through the window.",
    "A painting of a squirrel eating a burger. dance monkey. A photo of an astronaut riding a horse.",
    "Slow motion, time lapse, aerial drone footage, handheld camera, 4k, 1080p, 24 fps.",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024 . , : ; ! ? ' \" ( ) - _ / & % + = #",
)
# HunyuanVideo wraps every prompt in this chat template; training on it keeps its words whole.
HUNYUAN_TEMPLATE_TEXT = (
    "Describe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:"
)
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
)


def caption_corpus() -> list[str]:
    """A few hundred deterministic captions describing simple videos."""
    lines = [
        f"a {color} {subject} {motion} {scene}"
        for (color, subject), motion, scene in zip(
            itertools.product(_COLORS, _SUBJECTS), itertools.cycle(_MOTIONS), itertools.cycle(_SCENES)
        )
    ]
    lines.extend(_EXTRA)
    lines.append(HUNYUAN_TEMPLATE_TEXT)
    return lines


def _words(normalize: Callable[[str], str] | None, pre_tokenizer: Any) -> Counter[str]:
    """Corpus word counts, as the tokenizer's own normalizer and pre-tokenizer split the text."""
    counts: Counter[str] = Counter()
    for line in caption_corpus():
        text = normalize(line) if normalize else line
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
    return counts


def _merge_word(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _learn_bpe(words: dict[tuple[str, ...], int], num_merges: int) -> tuple[list[tuple[str, str]], Counter[str]]:
    """Greedy BPE: merge the most frequent pair (ties: smallest pair) num_merges times.

    Returns the merges in order and the count of each final token over the corpus.
    """
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            key = _merge_word(symbols, best) if best[0] in symbols else symbols
            merged[key] = merged.get(key, 0) + count
        words = merged
    token_counts: Counter[str] = Counter()
    for symbols, count in words.items():
        for symbol in symbols:
            token_counts[symbol] += count
    return merges, token_counts


def _ordered_vocab(*groups: Any) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token in itertools.chain(*groups):
        vocab.setdefault(token, len(vocab))
    return vocab


def build_t5_tokenizer(num_merges: int = 300, extra_ids: int = 100, model_max_length: int = 512) -> T5Tokenizer:
    """A SentencePiece-style Unigram tokenizer in T5's layout: <pad>=0, </s>=1, <unk>=2, pieces, sentinels."""
    from tokenizers import pre_tokenizers
    from transformers import T5Tokenizer

    # Same pre-tokenizer as T5Tokenizer builds for itself.
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    words = {tuple(word): n for word, n in _words(None, pre).items()}
    merges, counts = _learn_bpe(words, num_merges)
    pieces = sorted({c for word in words for c in word}) + ["".join(m) for m in merges]
    # Unigram scores: log-frequency of each piece in the corpus (add-one so unused pieces stay possible).
    total = sum(counts.values()) + len(pieces)
    scores = {p: round(math.log((counts.get(p, 0) + 1) / total), 4) for p in pieces}
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, scores[p]) for p in dict.fromkeys(pieces) if p not in ("<pad>", "</s>", "<unk>")]
    tok = T5Tokenizer(vocab=vocab, extra_ids=extra_ids, model_max_length=model_max_length)
    logger.debug("T5 tokenizer: %d tokens", len(tok))
    return tok


def build_clip_tokenizer(num_merges: int = 300, model_max_length: int = 77) -> CLIPTokenizer:
    """A byte-level BPE in CLIP's layout: 256 bytes, 256 bytes + '</w>', merges, then the two specials."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import CLIPTokenizer

    # Same normalizer and pre-tokenizer as CLIPTokenizer builds for itself.
    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words = {(*word[:-1], word[-1] + "</w>"): n for word, n in _words(norm.normalize_str, pre).items()}
    merges, _ = _learn_bpe(words, num_merges)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # Every byte, alone and word-final, so no text falls back to the unknown token (as in real CLIP).
    vocab = _ordered_vocab(
        alphabet, [c + "</w>" for c in alphabet], ["".join(m) for m in merges], ["<|startoftext|>", "<|endoftext|>"]
    )
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    logger.debug("CLIP tokenizer: %d tokens", len(tok))
    return tok


@lru_cache(maxsize=1)
def _llama_merges(max_merges: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    from tokenizers import pre_tokenizers

    # LlamaTokenizer's Metaspace does not split on spaces; splitting here keeps merges inside words.
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    words = {tuple(word): n for word, n in _words(None, pre).items()}
    merges, _ = _learn_bpe(words, max_merges)
    return tuple(sorted({c for word in words for c in word})), tuple(merges)


def build_llama_tokenizer(
    num_merges: int = 300, extra_special_tokens: tuple[str, ...] = (), model_max_length: int = 131072
) -> LlamaTokenizer:
    """A SentencePiece-style BPE with byte fallback in Llama's layout: <unk>, <s>, </s>, <0x00>..<0xFF>, pieces."""
    from transformers import LlamaTokenizer

    chars, all_merges = _llama_merges(600)
    merges = list(all_merges[:num_merges])
    vocab = _ordered_vocab(
        ["<unk>", "<s>", "</s>"], [f"<0x{b:02X}>" for b in range(256)], chars, ["".join(m) for m in merges]
    )
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=model_max_length,
        # The prompt is followed by padding, so a chat template stays at the front (HunyuanVideo's crop_start).
        padding_side="right",
        pad_token="<unk>",
        extra_special_tokens=list(extra_special_tokens) or None,
    )
    logger.debug("Llama tokenizer: %d tokens", len(tok))
    return tok


def build_llama3_tokenizer(num_merges: int = 300, model_max_length: int = 131072) -> PreTrainedTokenizerFast:
    """A byte-level BPE like Llama 3's (HiDream's tokenizer_4), with its special tokens, as a plain fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = {tuple(word): n for word, n in _words(None, pre).items()}
    merges, _ = _learn_bpe(words, num_merges)
    vocab = _ordered_vocab(sorted(pre_tokenizers.ByteLevel.alphabet()), ["".join(m) for m in merges])
    backend = Tokenizer(BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    # Llama 3's specials come after the BPE vocabulary, as in the real tokenizer.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    bos = LLAMA3_SPECIAL_TOKENS[0]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=LLAMA3_SPECIAL_TOKENS[1], model_max_length=model_max_length
    )
    logger.debug("Llama 3 tokenizer: %d tokens", len(tok))
    return tok
