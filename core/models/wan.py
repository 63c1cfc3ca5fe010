"""The Wan family (Wan 2.1, Wan 2.2 TI2V-5B, Wan 2.2 A14B): one VAE class, one text path.

What differs between them for caching comes from the folder's own configs: Wan 2.2 TI2V-5B's VAE
has 48 latent channels and 16x spatial compression (2x2 patchify on top of 8x), the others 16 and
8x. Text is UMT5, 512 tokens, trimmed to each caption's length and zero-padded, as WanPipeline does.

Latents: diffusers' examples hold no Wan training script; the one for the Wan-style VAE of
Qwen-Image (examples/dreambooth/train_dreambooth_lora_qwen_image.py), like its other latent
diffusion scripts, trains on a *sample* of the VAE posterior (latent_dist.sample(), also when
latents are cached), normalised as (sample - latents_mean) / latents_std. We do the same, with a
seeded generator so that a cache entry is reproducible (the caller seeds it from the cache key).
The original Wan repository's encode returns the mean instead; the two differ by the posterior's
spread.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import ModelAdapter, folder_identity

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

WAN_FAMILIES = ("wan21", "wan22_ti2v_5b", "wan22_a14b")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _place(module: Any, device: torch.device | str, dtype: torch.dtype) -> None:
    """Move a module only when it is elsewhere: a no-op .to() still makes diffusers warn."""
    import torch

    param, want = next(module.parameters()), torch.device(device)
    same_device = param.device.type == want.type and want.index in (None, param.device.index)
    if not same_device or param.dtype != dtype:
        module.to(device=device, dtype=dtype)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers draws a "Loading weights" progress bar per model: noise in a log."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


class WanAdapter(ModelAdapter):
    """A Wan model in a local diffusers folder (model_index.json, vae/, text_encoder/, tokenizer/...)."""

    max_text_length = 512  # WanPipeline.__call__'s max_sequence_length

    def __init__(self, folder: str | os.PathLike, family: str | None = None) -> None:
        super().__init__(folder)
        if family is None:
            from .registry import detect_family

            family = detect_family(self.folder)
        if family not in WAN_FAMILIES:
            raise ValueError(f"{family!r} is not a Wan family; expected one of {', '.join(WAN_FAMILIES)}")
        self.family = family
        self._vae: Any = None
        self._text_encoder: Any = None
        self._tokenizer: Any = None
        self._identities: dict[str, str] = {}

    # -- configs (read without loading any weights) ---------------------------------------------
    @cached_property
    def vae_config(self) -> dict[str, Any]:
        """vae/config.json with AutoencoderKLWan's defaults filled in, as from_pretrained would."""
        from diffusers import AutoencoderKLWan

        config = _read_json(self.folder / "vae" / "config.json")
        for name, param in inspect.signature(AutoencoderKLWan.__init__).parameters.items():
            if param.default is not inspect.Parameter.empty:
                config.setdefault(name, param.default)
        return config

    @cached_property
    def transformer_patch_size(self) -> tuple[int, int, int]:
        path = self.folder / "transformer" / "config.json"
        patch = _read_json(path).get("patch_size", (1, 2, 2)) if path.is_file() else (1, 2, 2)
        return tuple(int(v) for v in patch)  # type: ignore[return-value]

    @property
    def spatial_ratio(self) -> int:
        return int(self.vae_config["scale_factor_spatial"])

    @property
    def temporal_ratio(self) -> int:
        return int(self.vae_config["scale_factor_temporal"])

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config["z_dim"])

    @property
    def size_divisor(self) -> int:
        return self.spatial_ratio * self.transformer_patch_size[1]

    # -- identities ------------------------------------------------------------------------------
    def vae_identity(self) -> str:
        if "vae" not in self._identities:
            self._identities["vae"] = folder_identity("wan-vae", self.folder / "vae")
        return self._identities["vae"]

    def text_identity(self) -> str:
        if "text" not in self._identities:
            # Captions are cleaned with ftfy when it is installed (as WanPipeline does), which can
            # change the tokens, so whether it is installed is part of what produced an embedding.
            # find_spec rather than diffusers' is_ftfy_available: identities must not import torch.
            self._identities["text"] = folder_identity(
                "wan-text",
                self.folder / "text_encoder",
                self.folder / "tokenizer",
                extra={"ftfy": importlib.util.find_spec("ftfy") is not None},
            )
        return self._identities["text"]

    # -- loading ---------------------------------------------------------------------------------
    def _component(self, name: str) -> Path:
        path = self.folder / name
        if not path.is_dir():
            from core.errors import UserError

            raise UserError(f"{self.folder} has no {name}/ folder; point base_model at a complete diffusers model folder")
        return path

    def load_vae(self, device: torch.device | str, dtype: torch.dtype) -> Any:
        if self._vae is None:
            from diffusers import AutoencoderKLWan

            self._component("vae")
            logger.info("loading the VAE of %s", self.folder)
            self._vae = AutoencoderKLWan.from_pretrained(self.folder, subfolder="vae", torch_dtype=dtype)
            self._vae.requires_grad_(False).eval()
        _place(self._vae, device, dtype)
        return self._vae

    def load_text_encoder(self, device: torch.device | str, dtype: torch.dtype) -> Any:
        if self._text_encoder is None:
            from transformers import AutoTokenizer, UMT5EncoderModel

            self._component("text_encoder")
            self._component("tokenizer")
            logger.info("loading the text encoder of %s", self.folder)
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder, subfolder="tokenizer")
            with _quiet_transformers():
                self._text_encoder = UMT5EncoderModel.from_pretrained(self.folder, subfolder="text_encoder", dtype=dtype)
            self._text_encoder.requires_grad_(False).eval()
        _place(self._text_encoder, device, dtype)
        return self._text_encoder

    def unload_encoders(self) -> None:
        self._vae = self._text_encoder = self._tokenizer = None

    # -- encoding --------------------------------------------------------------------------------
    def encode_video(
        self, frames: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> float32 (B, z_dim, (F-1)/4+1, H/s, W/s), normalised.

        A posterior sample with `generator` (or a fixed seed-0 generator when None, so the result is
        reproducible either way); see the module docstring for why a sample and not the mode.
        """
        import torch

        if self._vae is None:
            raise RuntimeError("load_vae() must be called before encode_video()")
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"expected frames of shape (B, 3, F, H, W), got {tuple(frames.shape)}")
        vae = self._vae
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        param = next(vae.parameters())
        with torch.no_grad():
            dist = vae.encode(frames.to(device=param.device, dtype=param.dtype)).latent_dist
            latents = dist.sample(generator=generator).float()
        shape = (1, latents.shape[1], 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=latents.device).view(shape)
        # WanPipeline decodes with latents * std + mean; training targets are the inverse.
        return (latents - mean) / std

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """As WanPipeline._get_t5_prompt_embeds: clean, tokenize to 512, encode, zero past each length."""
        import torch
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        if self._text_encoder is None:
            raise RuntimeError("load_text_encoder() must be called before encode_text()")
        if isinstance(captions, str):
            captions = [captions]
        length = self.max_text_length
        inputs = self._tokenizer(
            [prompt_clean(c) for c in captions],
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = next(self._text_encoder.parameters()).device
        ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
        with torch.no_grad():
            hidden = self._text_encoder(ids, mask).last_hidden_state
        seq_lens = mask.gt(0).sum(dim=1)
        # Keep each caption's tokens, zero the rest: the transformer gets no mask, only these zeros.
        keep = torch.arange(length, device=device)[None, :] < seq_lens[:, None]
        embeds = torch.where(keep[:, :, None], hidden, torch.zeros((), dtype=hidden.dtype, device=device))
        return {"prompt_embeds": embeds, "prompt_mask": keep}

    # -- training ----------------------------------------------------------------------------------
    def transformer_names(self) -> tuple[str, ...]:
        return ("transformer", "transformer_2") if self.family == "wan22_a14b" else ("transformer",)

    def load_transformer(self, name: str, device: torch.device | str, dtype: torch.dtype) -> Any:
        from diffusers import WanTransformer3DModel

        self._component(name)
        logger.info("loading the %s of %s", name, self.folder)
        transformer = WanTransformer3DModel.from_pretrained(self.folder, subfolder=name, torch_dtype=dtype)
        transformer.requires_grad_(False).eval()
        _place(transformer, device, dtype)
        return transformer

    def default_lora_targets(self) -> list[str]:
        # Self- and cross-attention projections and the feed-forward layers of every block: what
        # diffusers' and musubi-tuner's Wan LoRAs train, and what ComfyUI's Wan LoRA loader maps.
        return ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ffn.net.0.proj", "ffn.net.2"]

    def predict(self, transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        from core.train.objective import expanded_timesteps, model_timesteps

        if getattr(transformer.config, "patch_size", None) and self.family == "wan22_ti2v_5b":
            # TI2V-5B takes one timestep per latent token (WanPipeline's expand_timesteps).
            timestep = expanded_timesteps(sigmas, tuple(noisy.shape), tuple(transformer.config.patch_size))
        else:
            timestep = model_timesteps(sigmas)
        # Inputs in the weights' storage dtype: without autocast (FLOAT_32 training over BFLOAT_16
        # weights) the first convolution would get float32 input for bfloat16 weights.
        # patch_embedding, not the first parameter: diffusers keeps scale_shift_table in float32.
        dtype = transformer.patch_embedding.weight.dtype
        return transformer(
            hidden_states=noisy.to(dtype),
            timestep=timestep,
            encoder_hidden_states=batch["prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
