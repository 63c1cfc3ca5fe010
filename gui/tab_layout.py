"""Which settings go on which tab: the one table the window's tabs are built from.

Entries are dotted keys of the schema: a Setting or SectionList becomes one form row, a Section
becomes a titled group with all of its settings. A test checks that every setting of the schema
lands on exactly one tab, so a new setting cannot be forgotten here.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config.fields import Section
from core.config.settings import iter_settings, lookup


@dataclass(frozen=True)
class TabSpec:
    name: str  # as in gui.launch.TAB_NAMES (the --tab argument)
    title: str
    entries: tuple[str, ...]


TABS: tuple[TabSpec, ...] = (
    TabSpec(
        "general",
        "General",
        (
            "training_method",
            "model_type",
            "base_model",
            "train_dtype",
            "workspace_dir",
            "cache_dir",
            "output_path",
            "output_format",
            "seed",
        ),
    ),
    TabSpec(
        "model", "Model", ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4", "vae", "experts", "layer_offload_fraction", "gradient_checkpointing")
    ),
    TabSpec(
        "data",
        "Data",
        ("datasets", "resolution", "frames", "strict_data", "cache_variants", "dataloader_threads", "validation"),
    ),
    TabSpec("video", "Video", ("video_config",)),
    TabSpec(
        "training",
        "Training",
        (
            "batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "stop_after",
            "max_steps",
            "epochs",
            "max_grad_norm",
            "optimizer",
            "optimizer_settings",
            "fused_backward",
            "lr_scheduler",
            "warmup_steps",
            "objective",
            "ema",
            "distributed",
        ),
    ),
    TabSpec("lora", "LoRA", ("lora",)),
    TabSpec("embedding", "Embedding", ("embedding", "embedding_learning_rate")),
    TabSpec("sampling", "Sampling", ("sampling",)),
    TabSpec("backup", "Backup", ("backup",)),
)


def tab_spec(name: str) -> TabSpec:
    for spec in TABS:
        if spec.name == name:
            return spec
    raise KeyError(name)


def expand_entry(entry: str) -> list[str]:
    """The dotted keys of the form rows (settings and lists) an entry stands for."""
    node = lookup(entry)
    if isinstance(node, Section):
        return [f"{entry}.{key}" for key, _ in iter_settings(node)]
    return [entry]


def tab_keys(spec: TabSpec) -> list[str]:
    return [key for entry in spec.entries for key in expand_entry(entry)]
