"""The one schema: what it declares, and that validation, merging and diffs derive from it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import (
    SCHEMA,
    defaults,
    get_value,
    iter_settings,
    lookup,
    merge,
    parse_set_arguments,
    resolve,
    set_value,
    sparse,
    validate_overlay,
)
from core.config.fields import (
    BOOL,
    CHOICE,
    FLOAT,
    INT,
    PATH,
    STR,
    STR_LIST,
    Section,
    SectionList,
    Setting,
)
from core.errors import ConfigError

# The video_config section exactly as the product's seed document declares it.
SEED_VIDEO_CONFIG = {
    "max_frames": 16,
    "frame_sample_strategy": "uniform",
    "target_fps": 24.0,
    "max_duration": 10.0,
    "temporal_consistency_weight": 1.0,
    "use_temporal_attention": True,
    "spatial_compression_ratio": 8,
    "temporal_compression_ratio": 4,
    "video_batch_size_multiplier": 0.5,
    "frame_dropout_probability": 0.0,
    "temporal_augmentation": False,
}

REQUIRED_KEYS = [
    "training_method", "model_type", "base_model", "train_dtype",
    "transformer.train", "transformer.learning_rate", "transformer.weight_dtype",
    "text_encoder.train", "text_encoder.learning_rate", "text_encoder.weight_dtype",
    "vae.train", "vae.learning_rate", "vae.weight_dtype",
    "layer_offload_fraction", "gradient_checkpointing", "batch_size", "gradient_accumulation_steps",
    "learning_rate", "embedding_learning_rate", "max_steps", "epochs", "max_grad_norm", "optimizer",
    "lr_scheduler", "warmup_steps", "seed", "resolution", "frames", "datasets", "workspace_dir",
    "cache_dir", "output_path", "output_format", "lora.rank", "lora.alpha", "lora.dropout",
    "lora.target_layers", "sampling.every_n_steps", "sampling.prompts", "sampling.width",
    "sampling.height", "sampling.frames", "sampling.inference_steps", "sampling.seed",
    "backup.every_n_steps", "backup.keep", "validation.every_n_steps", "validation.holdout_fraction",
    "validation.folder",
] + [f"video_config.{k}" for k in SEED_VIDEO_CONFIG]


def test_every_required_setting_is_declared() -> None:
    declared = {key for key, _ in iter_settings()}
    assert [k for k in REQUIRED_KEYS if k not in declared] == []


def test_video_config_matches_the_seed() -> None:
    assert defaults()["video_config"] == SEED_VIDEO_CONFIG
    assert lookup("video_config.temporal_consistency_weight").maximum == 2.0
    assert lookup("video_config.frame_dropout_probability").maximum == 0.3
    assert lookup("video_config.frame_sample_strategy").choices == ("uniform", "random", "keyframe")


def test_choices_of_the_brief() -> None:
    assert lookup("training_method").choices == ("LORA", "FINE_TUNE", "EMBEDDING")
    assert lookup("train_dtype").choices == ("FLOAT_32", "FLOAT_16", "BFLOAT_16")
    assert set(lookup("transformer.weight_dtype").choices) == {
        "FLOAT_32", "BFLOAT_16", "FLOAT_16", "FLOAT_8", "INT_8", "INT_4", "NFLOAT_4"
    }
    assert lookup("gradient_checkpointing").choices == ("OFF", "ON", "CPU_OFFLOADED")
    assert {"AUTO", "WAN_2_1", "WAN_2_2_TI2V_5B", "WAN_2_2_A14B_T2V", "WAN_2_2_A14B_I2V"} <= set(lookup("model_type").choices)
    assert defaults()["max_grad_norm"] == 1.0
    offload = lookup("layer_offload_fraction")
    assert (offload.minimum, offload.maximum) == (0.0, 1.0)


def _all_nodes(section: Section = SCHEMA):
    for child in section.children:
        yield child
        if isinstance(child, Section):
            yield from _all_nodes(child)
        if isinstance(child, SectionList):
            yield from _all_nodes(child.item)


def test_every_declaration_has_help_and_a_default_that_passes_its_own_check() -> None:
    for node in _all_nodes():
        assert node.help.strip(), node.name
        if isinstance(node, Setting):
            default = list(node.default) if isinstance(node.default, tuple) else node.default
            assert node.check(default) == default, node.name
            for key in node.applies_when:
                lookup(key)  # conditions name real settings


def test_defaults_resolve_and_sparse_of_defaults_is_empty() -> None:
    config = resolve()
    assert config == defaults()
    assert sparse(config) == {}


@pytest.mark.parametrize(
    ("overlay", "key", "words"),
    [
        ({"batch_size": 0}, "batch_size", "from 1 to 256"),
        ({"batch_size": 1.5}, "batch_size", "integer"),
        ({"batch_size": True}, "batch_size", "integer"),
        ({"learning_rate": "fast"}, "learning_rate", "number"),
        ({"optimizer": "adam"}, "optimizer", "ADAMW, ADAMW_8BIT"),
        ({"lora": {"rnak": 4}}, "lora.rnak", "lora.rank"),
        ({"lora": 4}, "lora", "JSON object"),
        ({"video_config": {"frame_dropout_probability": 0.31}}, "video_config.frame_dropout_probability", "0 to 0.3"),
        ({"video_config": {"temporal_consistency_weight": 2.5}}, "video_config.temporal_consistency_weight", "0 to 2"),
        ({"video_config": {"spatial_compression_ratio": 12}}, "video_config.spatial_compression_ratio", "4, 8, 16"),
        ({"datasets": {"path": "x"}}, "datasets", "list"),
        ({"datasets": [{"path": 3}]}, "datasets[0].path", "folder path"),
        ({"sampling": {"prompts": "one prompt"}}, "sampling.prompts", "list of strings"),
        ({"transformer": {"learning_rate": None}, "base_model": None}, "base_model", "null"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(overlay: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_overlay(overlay, source="x.json")
    message = str(info.value)
    assert message.startswith("x.json: ")
    assert key in message and words in message
    assert info.value.key == key
    assert "\n" not in message


def test_nullable_part_learning_rate_and_integral_floats() -> None:
    assert validate_overlay({"transformer": {"learning_rate": None}, "batch_size": 2.0}) == {
        "transformer": {"learning_rate": None},
        "batch_size": 2,
    }


def test_dataset_items_get_their_defaults() -> None:
    assert validate_overlay({"datasets": [{"path": "/data"}]})["datasets"] == [
        {"path": "/data", "repeats": 1, "caption_prefix": "", "caption_separator": ", ", "caption_dropout": 0.0, "loss_weight": 1.0}
    ]


def test_frames_larger_than_the_window_is_refused() -> None:
    with pytest.raises(ConfigError, match="video_config.max_frames"):
        resolve({"frames": 33})
    assert resolve({"frames": 33, "video_config": {"max_frames": 33}})["frames"] == 33


def test_set_arguments_read_json_else_text() -> None:
    overlay = parse_set_arguments(
        ["lora.rank=32", "base_model=/models/wan 2.1", 'sampling.prompts=["a cat", "a dog"]', "video_config.use_temporal_attention=false", "transformer.learning_rate=null"]
    )
    assert overlay == {
        "lora": {"rank": 32},
        "base_model": "/models/wan 2.1",
        "sampling": {"prompts": ["a cat", "a dog"]},
        "video_config": {"use_temporal_attention": False},
        "transformer": {"learning_rate": None},
    }
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_set_arguments(["lora.rank"])


def test_set_value_validates() -> None:
    config = defaults()
    set_value(config, "lora.rank", 8)
    assert get_value(config, "lora.rank") == 8
    with pytest.raises(ConfigError, match="lora.rank"):
        set_value(config, "lora.rank", 0)
    assert get_value(config, "lora.rank") == 8


def _value_strategy(setting: Setting):
    if setting.kind == BOOL:
        return st.booleans()
    if setting.kind == INT:
        return st.integers(int(setting.minimum), int(min(setting.maximum, 10**7)))
    if setting.kind == FLOAT:
        return st.floats(setting.minimum, setting.maximum, allow_nan=False)
    if setting.kind == CHOICE:
        return st.sampled_from(setting.choices)
    if setting.kind in (STR, PATH):
        return st.text(max_size=20)
    if setting.kind == STR_LIST:
        return st.lists(st.text(max_size=10), max_size=3)
    raise AssertionError(setting.kind)


LEAVES = [(key, node) for key, node in iter_settings() if isinstance(node, Setting)]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_valid_value_round_trips_through_sparse_and_merge(data) -> None:
    key, setting = data.draw(st.sampled_from(LEAVES))
    value = data.draw(_value_strategy(setting))
    config = defaults()
    set_value(config, key, value)
    stored = sparse(config)
    assert merge(defaults(), validate_overlay(stored)) == config
    assert get_value(config, key) == setting.check(value)


def test_applies_key_counts_the_sections_that_hold_a_setting() -> None:
    from core.config import applies_key

    config = defaults()
    assert applies_key("lora.rank", config) and not applies_key("embedding.placeholder_tokens", config)
    assert applies_key("max_steps", config) and not applies_key("epochs", config)
    set_value(config, "training_method", "EMBEDDING")
    set_value(config, "stop_after", "EPOCHS")
    assert not applies_key("lora.rank", config) and applies_key("embedding.placeholder_tokens", config)
    assert applies_key("epochs", config) and not applies_key("max_steps", config)
    assert not applies_key("output_format", config)


def test_a_rule_across_settings_names_every_setting_it_involves() -> None:
    from core.config import consistency_problems

    config = defaults()
    assert consistency_problems(config) == []
    config["frames"] = 20
    (problem,) = consistency_problems(config)
    assert problem.keys == ("frames", "video_config.max_frames")
