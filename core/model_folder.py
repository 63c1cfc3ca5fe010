"""From base_model to a local model folder: a path as it is, or a Hugging Face hub id from the local
hub cache (downloaded into it first when missing).

Below the model families on purpose: the VRAM estimate (core/memory) reads a model's configs from its
folder without loading any family's code.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import ConfigError

logger = logging.getLogger(__name__)

WHAT_TO_DO = (
    "set base_model to a local diffusers model folder (the one holding model_index.json, "
    "vae/, text_encoder/, tokenizer/ and transformer/), or download the model first"
)


# What a diffusers model repository holds that training and sampling need; other files (the original
# release's checkpoints, which some repositories carry beside the diffusers folders, images) are not fetched.
HUB_PATTERNS = ("model_index.json", "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json",
                "tokenizer/*", "*/*.txt", "*/*.model", "*/*.json")


def _looks_like_hub_id(text: str, path: Path) -> bool:
    return text.count("/") == 1 and not path.is_absolute() and not text.startswith((".", "~"))


def hub_download_needed(base_model: str) -> bool:
    """Whether base_model is a hub id that is not in the local cache and would be downloaded now
    (the hub not switched off). Never downloads; an unusable base_model is False here (and a
    ConfigError from resolve_model_folder)."""
    text = str(base_model).strip()
    path = Path(text).expanduser()
    if not text or path.exists() or not _looks_like_hub_id(text, path):
        return False
    try:
        resolve_model_folder(text, download=False)
    except ConfigError:
        from huggingface_hub import constants

        return not constants.HF_HUB_OFFLINE
    return False


def hub_is_offline() -> bool:
    """Whether downloading from the Hugging Face hub is switched off (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


DownloadProgress = Callable[[int, "int | None"], None]  # (bytes done, bytes in all or None while unknown)


def _progress_class(report: DownloadProgress) -> type:
    """A tqdm class for huggingface_hub's tqdm_class that prints nothing and reports the bytes of
    the download: snapshot_download makes byte bars (unit "B") whose totals grow as files start;
    the largest count and total of them are reported."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    lock = threading.Lock()
    bars: dict[int, tuple[int, int | None]] = {}

    class Reporter(hub_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._bytes = kwargs.get("unit") == "B"
            self._count = int(kwargs.get("initial") or 0)
            kwargs["disable"] = True  # the window shows it; nothing on the terminal
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            self._count += int(n or 0)
            if self._bytes:
                with lock:
                    bars[id(self)] = (self._count, int(self.total) if self.total else None)
                    done = max(count for count, _ in bars.values())
                    totals = [total for _, total in bars.values() if total]
                report(done, max(totals) if totals else None)
            return super().update(n)

    return Reporter


def resolve_model_folder(base_model: str, *, download: bool = True, progress: DownloadProgress | None = None) -> Path:
    """base_model as a local folder: a path, or a Hugging Face hub id: taken from the local Hugging
    Face cache, and downloaded into it first when missing (unless `download` is False or the hub is
    switched off with HF_HUB_OFFLINE=1). progress(done, total): the download's bytes, as they come
    (from huggingface_hub's threads)."""
    text = str(base_model).strip()
    if not text:
        raise ConfigError(f"base_model is empty; {WHAT_TO_DO}", key="base_model")
    path = Path(text).expanduser()
    if path.is_dir():
        return path.absolute()
    if path.is_file():
        raise ConfigError(
            f"base_model {text} is a single file; put a single-file transformer checkpoint in transformer.model_path "
            f"and set base_model to the diffusers model it belongs to ({WHAT_TO_DO})",
            key="base_model",
        )
    if not _looks_like_hub_id(text, path):
        raise ConfigError(f"base_model folder {path.absolute()} does not exist; {WHAT_TO_DO}", key="base_model")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - a dependency of diffusers
        raise ConfigError(f"base_model {text} is a hub id, but huggingface_hub cannot be imported ({exc})", key="base_model") from exc
    try:
        return Path(snapshot_download(text, local_files_only=True, allow_patterns=list(HUB_PATTERNS)))
    except LocalEntryNotFoundError:
        logger.debug("hub id %s is not in the local cache", text)
    except Exception as exc:  # a damaged cache entry: say so rather than download over it blindly
        logger.debug("hub id %s: local cache unusable: %s", text, exc)
    from huggingface_hub import constants

    if not download or constants.HF_HUB_OFFLINE:
        how = ("downloading is off (HF_HUB_OFFLINE); unset HF_HUB_OFFLINE and train once with an internet "
               "connection to download it" if constants.HF_HUB_OFFLINE else
               "this command does not download; training (or Start in the window) downloads it once")
        raise ConfigError(
            f"base_model {text} is not in the local Hugging Face cache and {how}, or set base_model to a local "
            "diffusers model folder (the one holding model_index.json, vae/, text_encoder/, tokenizer/ and transformer/)",
            key="base_model",
        )
    logger.info("downloading %s from the Hugging Face hub into %s (once; later runs use the copy)", text, constants.HF_HUB_CACHE)
    try:
        extra = {"tqdm_class": _progress_class(progress)} if progress is not None else {}
        return Path(snapshot_download(text, allow_patterns=list(HUB_PATTERNS), **extra))
    except Exception as exc:  # no network, unknown repository, gated model, full disk: one line each
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"base_model {text} could not be downloaded ({reason}); check the id and the internet connection "
            f"(gated models need `huggingface-cli login`), or {WHAT_TO_DO}",
            key="base_model",
        ) from exc
