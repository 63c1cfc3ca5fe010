"""Loading helpers every family adapter shares: reading configs, placing modules, quiet loads, and the
frozen VAE and text encoders.

torch and transformers are imported inside the functions, so reading a config stays light.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from core.memory.quantize import LayerFilter

logger = logging.getLogger(__name__)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def place(module: Any, device: torch.device | str, dtype: torch.dtype) -> None:
    """Move a module only when it is elsewhere: a no-op .to() still makes diffusers warn."""
    import torch

    param, want = next(module.parameters()), torch.device(device)
    same_device = param.device.type == want.type and want.index in (None, param.device.index)
    if not same_device or param.dtype != dtype:
        module.to(device=device, dtype=dtype)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers draws a "Loading weights" progress bar per model: noise in a log."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def component(folder: Path, name: str) -> Path:
    """folder/name, which must be a folder: a clear message where a download stopped short."""
    path = folder / name
    if not path.is_dir():
        from core.errors import UserError

        raise UserError(f"{folder} has no {name}/ folder; point base_model at a complete diffusers model folder")
    return path


def component_config(folder: Path, subfolder: str) -> dict[str, Any]:
    """A component's config.json ({} where the folder has none)."""
    path = folder / subfolder / "config.json"
    return read_json(path) if path.is_file() else {}


def config_with_class_defaults(folder: Path, subfolder: str, class_name: str) -> dict[str, Any]:
    """A component's config.json with the diffusers class's defaults filled in, as from_pretrained
    would: what a config leaves out, the class sets."""
    import inspect

    import diffusers

    config = read_json(folder / subfolder / "config.json")
    for name, param in inspect.signature(getattr(diffusers, class_name).__init__).parameters.items():
        if param.default is not inspect.Parameter.empty:
            config.setdefault(name, param.default)
    return config


def load_frozen_transformer(folder: Path, name: str, class_name: str, dtype: torch.dtype) -> Any:
    """The folder's `name`/ (a denoiser) as the diffusers class `class_name`, frozen, in eval mode."""
    import diffusers

    component(folder, name)
    logger.info("loading the %s of %s", name, folder)
    transformer = getattr(diffusers, class_name).from_pretrained(folder, subfolder=name, torch_dtype=dtype)
    return transformer.requires_grad_(False).eval()


def load_frozen_vae(folder: Path, vae_class: str, dtype: torch.dtype) -> Any:
    """The folder's vae/ as the diffusers class `vae_class`, frozen, in eval mode."""
    import diffusers

    component(folder, "vae")
    logger.info("loading the VAE of %s", folder)
    vae = getattr(diffusers, vae_class).from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
    return vae.requires_grad_(False).eval()


def no_kv_cache(encoder: Any) -> None:
    """A decoder used as a text encoder (Llama, Llava's language model) reads its hidden states once:
    its KV cache (every layer's keys and values, kept by default) would only hold memory, about half
    a hidden state per layer and token (core/memory/part_sizes.py counts without it)."""
    config = encoder.config
    for part in (config, getattr(config, "text_config", None)):
        if part is not None and getattr(part, "use_cache", False):
            part.use_cache = False


class FrozenTextEncoder:
    """One tokenizer / text encoder pair of a diffusers folder, loaded once, frozen, and loaded again
    only when asked for another quantized storage (the quantized Linear layers cannot be undone)."""

    def __init__(self, folder: Path, encoder_class: str | Callable[[], type], *, subfolder: str = "text_encoder",
                 tokenizer_subfolder: str = "tokenizer") -> None:
        self.folder, self.encoder_class = folder, encoder_class
        self.subfolder, self.tokenizer_subfolder = subfolder, tokenizer_subfolder
        self.tokenizer: Any = None
        self.encoder: Any = None
        self.quantized: str | None = None

    def load(self, device: torch.device | str, dtype: torch.dtype, weight_dtype: str | None,
             layer_filter: Callable[[str], LayerFilter]) -> Any:
        """The encoder on `device`, computing in `dtype`; a quantized `weight_dtype` (FLOAT_8, INT_8,
        INT_4, NFLOAT_4) stores the Linear layers `layer_filter(weight_dtype)` matches quantized."""
        import torch
        import transformers

        from core.memory.quantize import is_quantized_dtype, quantize_model

        quantized = weight_dtype if weight_dtype is not None and is_quantized_dtype(weight_dtype) else None
        if self.encoder is not None and quantized != self.quantized:
            self.encoder = None  # asked for another storage: load again
        if self.encoder is None:
            component(self.folder, self.subfolder)
            component(self.folder, self.tokenizer_subfolder)
            logger.info("loading the %s of %s", self.subfolder.replace("_", " "), self.folder)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder, subfolder=self.tokenizer_subfolder)
            with quiet_transformers():
                # A class name of transformers, or a function returning the class (built lazily, so that
                # naming it does not import transformers).
                cls = getattr(transformers, self.encoder_class) if isinstance(self.encoder_class, str) else self.encoder_class()
                self.encoder = cls.from_pretrained(
                    self.folder, subfolder=self.subfolder, dtype=dtype)
            self.encoder.requires_grad_(False).eval()
            no_kv_cache(self.encoder)
            self.quantized = quantized
            if quantized:
                work = device if torch.device(device).type == "cuda" else None
                quantize_model(self.encoder, quantized, include=layer_filter(quantized), work_device=work)
        if quantized:
            self.encoder.to(device)  # the quantized storage moves as it is; no dtype cast
        else:
            place(self.encoder, device, dtype)
        return self.encoder

    def unload(self) -> None:
        self.tokenizer = self.encoder = None
