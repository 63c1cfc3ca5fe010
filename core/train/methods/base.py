"""The interface the trainer's loop uses for every training method."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.models.base import Denoiser, ModelAdapter

# The mark in the safetensors header of every LoRA and embedding file the app writes; the output
# guard (core/train/output_guard.py) overwrites only files that carry it.
WRITTEN_BY = {"video_trainer.written_by": "Video Trainer"}


class TrainedParts(ABC):
    """The trained parameters of a run, the denoisers they live in or feed, and how they are saved.

    Built by the trainer in this order: load() (the denoisers, with what trains in them), then the
    trainer places the denoisers on the device, builds the optimizer over param_groups(), prepares
    the models in prepared_models() for DDP, and runs the loop, which calls prepare_batch() before
    each forward pass. named_trainable() is what a backup stores and restores; save() writes the
    result the user asked for.
    """

    def __init__(self, config: dict[str, Any], adapter: ModelAdapter, device: Any) -> None:
        self.config = config
        self.adapter = adapter
        self.device = device
        self.denoisers: list[Denoiser] = []
        self.transformers: list[Any] = []

    @abstractmethod
    def load(self, denoisers: list[Denoiser], load_denoiser: Callable[[str], Any]) -> None:
        """Load the denoisers (load_denoiser(name) gives one, frozen, in its storage dtype, not yet
        placed) and make this method's parameters trainable."""

    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups: {"params": [...], "lr": ...}; groups with no params are dropped later."""

    @abstractmethod
    def named_trainable(self) -> dict[str, Any]:
        """Every trained parameter by a name stable across runs of the same settings."""

    def trainable(self) -> list[Any]:
        """The trained parameters (what clipping walks every step): listed once, after load()."""
        if getattr(self, "_trainable", None) is None:
            self._trainable = list(self.named_trainable().values())
        return self._trainable

    def use_transformers(self, transformers: list[Any]) -> None:
        """Hold these denoisers instead (FSDP's whole copies for the final save)."""
        self.transformers = list(transformers)
        self._trainable = None

    def trains_denoisers(self) -> bool:
        """Whether the denoisers hold trained parameters (then DDP wraps them)."""
        return True

    def prepare_batch(self, batch: dict[str, Any], sample_captions: Callable[[list[Any]], list[str]]) -> dict[str, Any]:
        """The batch as the forward pass needs it. `sample_captions(sample_ids)` gives the captions of
        the batch's samples, for methods that encode text live. Default: the cached embeddings."""
        return batch

    def set_train_mode(self, training: bool) -> None:
        """Train/eval mode of what trains outside the denoisers (the text encoder); the trainer sets
        the denoisers' own modes."""

    @property
    def keeps_text_encoder(self) -> bool:
        """Whether the text encoder stays loaded during training (sampling must not unload it)."""
        return False

    def reduce_gradients(self, accelerator: Any) -> None:
        """Average gradients across processes for parameters DDP does not wrap (none by default)."""

    @abstractmethod
    def save(self, models: list[Any], steps: int, *, ema_suffix: str = "") -> list[Path]:
        """Write the result (models: the trained denoisers, unwrapped); ema_suffix names the copy
        saved from the EMA weights. Returns the written paths."""

    def output_path(self) -> Path:
        return Path(self.config["output_path"]).expanduser()

    # What save() writes, known before anything loads: the output guard (core/train/output_guard.py)
    # checks these paths before the first step and again before the final save.
    saves_folder = False  # a folder (FINE_TUNE's diffusers model) rather than one file

    @classmethod
    def result_paths(cls, config: dict[str, Any], adapter: ModelAdapter, denoiser_names: list[str], *,
                     ema_suffix: str = "") -> list[Path]:
        """The paths save() writes for these settings; ema_suffix for the copy from the EMA weights."""
        return [ema_path(Path(config["output_path"]).expanduser(), ema_suffix)]


def ema_path(path: Path, suffix: str) -> Path:
    """`name.safetensors` -> `name-ema.safetensors`; a folder `name` -> `name-ema`."""
    if not suffix:
        return path
    if path.suffix:
        return path.with_name(f"{path.stem}{suffix}{path.suffix}")
    return path.with_name(f"{path.name}{suffix}")
