"""Textual inversion on the tiny Wan UMT5 encoder: placeholder tokens, their training, files and loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import ConfigError, UserError
from core.export.embedding import read_embedding, save_embedding
from core.models.wan import WanAdapter
from core.train.embedding import (
    TOKENS_KEY,
    WORDS_KEY,
    PlaceholderEmbeddings,
    add_placeholder_tokens,
    encode_captions_live,
    load_embedding,
    merge_live_embeddings,
)

pytestmark = pytest.mark.numerics  # results depend on float kernels: docs/testing.md

CAPTION = "a <concept> walking through a green field"
PLAIN = "a red car moving left across a city street"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Only the parts the text path reads: the tiny real UMT5 encoder and tokenizer of the Wan builder.
    from core.models.tiny.wan import _text_encoder_and_tokenizer

    out = tmp_path_factory.mktemp("tiny-wan-text")
    text_encoder, tokenizer = _text_encoder_and_tokenizer(0)
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    return out


def _adapter(folder: Path, weight_dtype: str | None = None) -> WanAdapter:
    adapter = WanAdapter(folder, family="wan21")
    adapter.load_text_encoder("cpu", torch.float32, weight_dtype)
    return adapter


def _embeds(adapter: WanAdapter, caption: str) -> torch.Tensor:
    return adapter.encode_text([caption])["prompt_embeds"]


def _train(adapter: WanAdapter, placeholders: PlaceholderEmbeddings, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(placeholders.parameters(), lr=0.05, weight_decay=0.0)
    target = torch.randn((1, adapter.max_text_length, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        embeds = adapter.encode_text([CAPTION], grad=True)["prompt_embeds"]
        loss = (embeds - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_tokens_get_one_new_id_each_and_rows_start_at_their_words(folder: Path) -> None:
    adapter = _adapter(folder)
    tokenizer, encoder = adapter.text_parts()["text_encoder"]
    before, table = len(tokenizer), encoder.get_input_embeddings().weight
    placeholders = add_placeholder_tokens(tokenizer, encoder, ["<concept>", "<style>", "<zz>"], ["person", "cat", "zzq"])
    assert placeholders.tokens == ["<concept>", "<style>", "<zz>"]
    assert placeholders.token_ids == [before, before + 1, before + 2] and len(tokenizer) == before + 3
    ids = tokenizer("a <concept>, <style>.", add_special_tokens=False).input_ids
    assert ids.count(before) == 1 and ids.count(before + 1) == 1
    assert placeholders.rows.dtype == torch.float32 and placeholders.rows.shape == (3, 32)
    assert placeholders.rows.requires_grad and not table.requires_grad
    (person,) = tokenizer("person", add_special_tokens=False).input_ids
    assert torch.equal(placeholders.rows[0], table[person])
    assert torch.equal(placeholders.rows[1], table[tokenizer("cat", add_special_tokens=False).input_ids[0]])
    # A split word: the mean of its pieces, without the bare word-start piece "▁".
    pieces = [i for i in tokenizer("zzq", add_special_tokens=False).input_ids if tokenizer.decode([i]).strip()]
    assert len(pieces) == 3 and torch.allclose(placeholders.rows[2], table[pieces].mean(0))
    # One word for all tokens.
    other = _adapter(folder)
    shared = add_placeholder_tokens(*other.text_parts()["text_encoder"], ["<a>", "<b>"], ["person"])
    assert torch.equal(shared.rows[0], shared.rows[1]) and torch.equal(shared.rows[0], table[person])
    assert placeholders.contains_placeholder(CAPTION) and not placeholders.contains_placeholder(PLAIN)


@pytest.mark.parametrize(
    ("tokens", "words", "key", "says"),
    [
        (["cat"], ["person"], TOKENS_KEY, "already a word"),
        (["<concept>", "<concept>"], ["person"], TOKENS_KEY, "repeat"),
        (["my concept"], ["person"], TOKENS_KEY, "without spaces"),
        (["</s>"], ["person"], TOKENS_KEY, "already a word"),
        ([], ["person"], TOKENS_KEY, "at least one"),
        (["<a>", "<b>", "<c>"], ["person", "cat"], WORDS_KEY, "one word per token"),
        (["<concept>"], [""], WORDS_KEY, "gives no tokens"),
        (["<concept>"], ["</s>"], WORDS_KEY, "gives no tokens"),
    ],
)
def test_bad_settings_are_config_errors_that_change_nothing(folder: Path, tokens: list[str], words: list[str], key: str, says: str) -> None:
    adapter = _adapter(folder)
    tokenizer, encoder = adapter.text_parts()["text_encoder"]
    size, module = len(tokenizer), encoder.get_input_embeddings()
    with pytest.raises(ConfigError, match=says) as caught:
        add_placeholder_tokens(tokenizer, encoder, tokens, words)
    assert caught.value.key == key
    assert len(tokenizer) == size and encoder.get_input_embeddings() is module


def test_training_moves_only_the_rows(folder: Path) -> None:
    adapter = _adapter(folder)
    encoder = adapter.text_parts()["text_encoder"][1]
    weights = {name: p.detach().clone() for name, p in encoder.state_dict().items()}
    plain_before = _embeds(adapter, PLAIN)
    placeholders = add_placeholder_tokens(adapter.text_parts()["text_encoder"][0], encoder, ["<concept>"], ["person"])
    assert not any(p.requires_grad for p in encoder.parameters())
    assert list(placeholders.parameters()) == [placeholders.rows]
    start, concept_before = placeholders.rows.detach().clone(), _embeds(adapter, CAPTION)
    _train(adapter, placeholders)
    assert not torch.equal(placeholders.rows, start)
    assert not torch.allclose(_embeds(adapter, CAPTION), concept_before)
    assert torch.equal(_embeds(adapter, PLAIN), plain_before)
    assert all(p.grad is None for p in encoder.parameters())
    # Every weight of the encoder, the embedding table included, is bit-identical and not copied.
    table = encoder.get_input_embeddings().weight
    assert table.shape[0] == weights["shared.weight"].shape[0]
    placeholders.remove()
    assert type(encoder.get_input_embeddings()) is torch.nn.Embedding and encoder.encoder.embed_tokens is encoder.shared
    after = encoder.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())
    assert encoder.shared.weight is table
    assert "<concept>" not in adapter.text_parts()["text_encoder"][0].get_vocab()
    assert torch.equal(_embeds(adapter, PLAIN), plain_before)


def test_live_encodings_merge_into_a_cached_batch_and_carry_gradients(folder: Path) -> None:
    adapter = _adapter(folder)
    placeholders = add_placeholder_tokens(*adapter.text_parts()["text_encoder"], ["<concept>"], ["person"])
    captions = [PLAIN, CAPTION, PLAIN]
    cached = adapter.encode_text(captions)  # as the text cache would serve them (16 tokens wide here)
    batch = {"prompt_embeds": cached["prompt_embeds"][:, :16].clone(), "prompt_mask": cached["prompt_mask"], "step": 0}
    assert not adapter.encode_text([CAPTION])["prompt_embeds"].requires_grad  # the default builds no graph
    with torch.no_grad():  # grad=True holds also inside a caller's no_grad
        live = encode_captions_live(adapter, captions, placeholders)
    assert live["indices"] == [1] and live["prompt_embeds"].requires_grad
    merged = merge_live_embeddings(batch, live)
    assert merged["prompt_embeds"].shape == batch["prompt_embeds"].shape and merged["step"] == 0
    assert torch.equal(merged["prompt_embeds"][[0, 2]], batch["prompt_embeds"][[0, 2]])
    assert torch.equal(merged["prompt_embeds"][1], live["prompt_embeds"][0, :16].detach())
    assert torch.equal(merged["prompt_mask"][1], live["prompt_mask"][0])
    merged["prompt_embeds"].sum().backward()
    assert placeholders.rows.grad is not None and placeholders.rows.grad.abs().sum() > 0
    # A batch too narrow for the live caption grows instead of cutting its tokens.
    narrow = {"prompt_embeds": cached["prompt_embeds"][:, :2], "prompt_mask": cached["prompt_mask"]}
    tokens = int(live["prompt_mask"][0].sum())
    assert merge_live_embeddings(narrow, live)["prompt_embeds"].shape[1] == tokens
    assert encode_captions_live(adapter, [PLAIN], placeholders)["indices"] == []
    assert merge_live_embeddings(batch, encode_captions_live(adapter, [PLAIN] * 3, placeholders)) == batch


def test_save_and_load_give_identical_encodings(folder: Path, tmp_path: Path) -> None:
    adapter = _adapter(folder)
    placeholders = add_placeholder_tokens(*adapter.text_parts()["text_encoder"], ["<style>", "<concept>"], ["cat", "person"])
    _train(adapter, placeholders, steps=2)
    path = save_embedding(tmp_path / "out" / "concept.safetensors", placeholders, {"initializer_words": ["cat", "person"], "base_model": str(folder), "step": 2})
    vectors, metadata = read_embedding(path)
    assert list(vectors) == ["<style>", "<concept>"] and metadata["step"] == "2" and metadata["base_model"] == str(folder)
    assert all(torch.equal(vectors[t], v) for t, v in placeholders.vectors().items())
    fresh = _adapter(folder)
    loaded = load_embedding(path, *fresh.text_parts()["text_encoder"])
    assert loaded.token_ids == placeholders.token_ids
    for caption in (CAPTION, "<style> <concept>", PLAIN):
        assert torch.equal(_embeds(fresh, caption), _embeds(adapter, caption))
    # Backups: state_dict round trip into the same Parameter.
    state, rows = placeholders.state_dict(), placeholders.rows
    with torch.no_grad():
        rows.zero_()
    placeholders.load_state_dict(state)
    assert placeholders.rows is rows and torch.equal(rows[1], vectors["<concept>"])


def test_bad_embedding_files_are_user_errors(folder: Path, tmp_path: Path) -> None:
    adapter = _adapter(folder)
    wrong = save_embedding(tmp_path / "wide.safetensors", {"<concept>": torch.zeros(64)})
    with pytest.raises(UserError, match="another model"):
        load_embedding(wrong, *adapter.text_parts()["text_encoder"])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read"):
        load_embedding(junk, *adapter.text_parts()["text_encoder"])


def test_diffusers_textual_inversion_loader_accepts_the_file(folder: Path, tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from diffusers.loaders import TextualInversionLoaderMixin
    from safetensors.torch import load_file

    class Pipeline(WanPipeline, TextualInversionLoaderMixin):
        pass

    def pipeline() -> Pipeline:
        fresh = _adapter(folder)
        return Pipeline(tokenizer=fresh.text_parts()["text_encoder"][0], text_encoder=fresh.text_parts()["text_encoder"][1], vae=None,
                        scheduler=FlowMatchEulerDiscreteScheduler(), transformer=None)

    def diffusers_embeds(pipe: Pipeline, caption: str) -> torch.Tensor:
        return pipe.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")[0]

    adapter = _adapter(folder)
    one = add_placeholder_tokens(*adapter.text_parts()["text_encoder"], ["<concept>"], ["person"])
    _train(adapter, one, steps=2)
    single = save_embedding(tmp_path / "one.safetensors", one)
    pipe = pipeline()
    pipe.load_textual_inversion(str(single))
    assert torch.equal(diffusers_embeds(pipe, CAPTION), _embeds(adapter, CAPTION))

    two_adapter = _adapter(folder)
    two = add_placeholder_tokens(*two_adapter.text_parts()["text_encoder"], ["<style>", "<concept>"], ["cat", "person"])
    _train(two_adapter, two, steps=1)
    double = save_embedding(tmp_path / "two.safetensors", two)
    pipe = pipeline()
    with pytest.raises(ValueError, match="single key"):
        pipe.load_textual_inversion(str(double))  # by path diffusers wants one token per file
    pipe.load_textual_inversion([{k: v} for k, v in load_file(double).items()])
    assert torch.equal(diffusers_embeds(pipe, "<style> <concept>"), _embeds(two_adapter, "<style> <concept>"))


@pytest.mark.parametrize("weight_dtype", ["INT_8"])
def test_rows_train_on_a_quantized_encoder(folder: Path, weight_dtype: str, tmp_path: Path) -> None:
    from core.memory.quantize import quantized_layer_names

    adapter = _adapter(folder, weight_dtype)
    assert quantized_layer_names(adapter.text_parts()["text_encoder"][1])  # the tiny widths are all quantizable
    plain_before = _embeds(adapter, PLAIN)
    placeholders = add_placeholder_tokens(*adapter.text_parts()["text_encoder"], ["<concept>"], ["person"])
    start = placeholders.rows.detach().clone()
    _train(adapter, placeholders, steps=2)
    assert not torch.equal(placeholders.rows, start) and torch.isfinite(placeholders.rows).all()
    assert torch.equal(_embeds(adapter, PLAIN), plain_before)
    path = save_embedding(tmp_path / "q.safetensors", placeholders)
    fresh = _adapter(folder, weight_dtype)
    load_embedding(path, *fresh.text_parts()["text_encoder"])
    assert torch.equal(_embeds(fresh, CAPTION), _embeds(adapter, CAPTION))
