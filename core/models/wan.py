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
import logging
import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.identity import folder_identity

from .base import Denoiser, ModelAdapter, SampleRequest
from .conditions import ConditionSpec
from .loading import (
    FrozenTextEncoder,
    component,
    component_config,
    config_with_class_defaults,
    load_frozen_transformer,
    load_frozen_vae,
)
from .loading import place as _place
from .loading import read_json as _read_json
from .wan_attention import FrameLocalAttention

if TYPE_CHECKING:
    import torch

    from core.memory.quantize import LayerFilter

    from .objectives import Objective

logger = logging.getLogger(__name__)

WAN_FAMILIES = ("wan21", "wan22_ti2v_5b", "wan22_a14b", "wan22_a14b_i2v")
TWO_EXPERTS = ("wan22_a14b", "wan22_a14b_i2v")


def _has_component(index: dict[str, Any], name: str) -> bool:
    value = index.get(name)
    return isinstance(value, list) and len(value) == 2 and value[0] is not None and value[1] is not None


class WanAdapter(ModelAdapter):
    """A Wan model in a local diffusers folder (model_index.json, vae/, text_encoder/, tokenizer/...)."""

    max_text_length = 512  # WanPipeline.__call__'s max_sequence_length

    def __init__(self, folder: str | os.PathLike, family: str | None = None) -> None:
        super().__init__(folder)
        if family is None:
            family = self.detect(_read_json(self.folder / "model_index.json"))
        if family not in WAN_FAMILIES:
            raise ValueError(f"{family!r} is not a Wan family; expected one of {', '.join(WAN_FAMILIES)}")
        self.family = family
        self._vae: Any = None
        self._text = FrozenTextEncoder(self.folder, "UMT5EncoderModel")
        self._identities: dict[str, str] = {}

    @classmethod
    def detect(cls, index: dict[str, Any]) -> str | None:
        """The Wan variant a model_index.json describes: TI2V-5B by its per-token timesteps, A14B by
        its second expert (transformer_2); the image-to-video pipeline of 2.1 or of 2.2 A14B."""
        pipeline = str(index.get("_class_name", ""))
        two_experts = _has_component(index, "transformer_2")
        if pipeline == "WanPipeline":
            if index.get("expand_timesteps"):
                return "wan22_ti2v_5b"
            return "wan22_a14b" if two_experts else "wan21"
        if pipeline == "WanImageToVideoPipeline":
            return "wan22_a14b_i2v" if two_experts else "wan21_i2v"
        return None

    # -- configs (read without loading any weights) ---------------------------------------------
    @cached_property
    def vae_config(self) -> dict[str, Any]:
        """vae/config.json with AutoencoderKLWan's defaults filled in, as from_pretrained would."""
        return config_with_class_defaults(self.folder, "vae", "AutoencoderKLWan")

    @cached_property
    def transformer_patch_size(self) -> tuple[int, int, int]:
        patch = component_config(self.folder, "transformer").get("patch_size", (1, 2, 2))
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
            # An image-to-video model's entries also hold the first frame's latents (encode_video).
            label = "wan-vae-i2v" if self.image_conditioned else "wan-vae"
            self._identities["vae"] = folder_identity(label, self.folder / "vae")
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
    def load_vae(self, device: torch.device | str, dtype: torch.dtype) -> Any:
        if self._vae is None:
            self._vae = load_frozen_vae(self.folder, "AutoencoderKLWan", dtype)
        _place(self._vae, device, dtype)
        return self._vae

    def load_text_encoder(self, device: torch.device | str, dtype: torch.dtype, weight_dtype: str | None = None,
                          *, name: str = "text_encoder") -> Any:
        if name != "text_encoder":
            raise ValueError(f"{self.family} has one text encoder, text_encoder; there is no {name!r}")
        return self._text.load(device, dtype, weight_dtype, lambda dtype_name: self.quantize_filter("text_encoder", dtype_name))

    def text_parts(self) -> dict[str, tuple[Any, Any]]:
        """{"text_encoder": (tokenizer, text encoder)} as load_text_encoder left them (None, None before)."""
        return {"text_encoder": (self._text.tokenizer, self._text.encoder)}

    def condition_layout(self) -> dict[str, ConditionSpec]:
        # UMT5's (512, D) embeddings zeroed past each caption's tokens, padded back in the collate,
        # and the (512,) mask, stored whole: predict reads prompt_embeds (the transformer takes no mask).
        return {"prompt_embeds": ConditionSpec(0, 0.0), "prompt_mask": ConditionSpec(None, False)}

    def unload_encoders(self) -> None:
        self._vae = None
        self._text.unload()

    def clean_caption(self, caption: str) -> str:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # what encode_text applies

        return prompt_clean(caption)

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
        latents = (latents - mean) / std
        if not self.image_conditioned:
            return latents
        # What WanImageToVideoPipeline conditions on: the VAE's mode for the first picture followed by
        # black frames, normalised the same way. Cached beside the clip's latents (split_latents).
        first = frames[:, :, :1]
        condition_input = torch.cat([first, torch.zeros_like(frames[:, :, 1:])], dim=2)
        with torch.no_grad():
            condition = vae.encode(condition_input.to(device=param.device, dtype=param.dtype)).latent_dist.mode().float()
        return torch.cat([latents, (condition - mean) / std], dim=1)

    def encode_text(self, captions: list[str], grad: bool = False) -> dict[str, torch.Tensor]:
        """As WanPipeline._get_t5_prompt_embeds: clean, tokenize to 512, encode, zero past each length.

        grad=True keeps autograd on (even inside a no_grad caller) for textual inversion."""
        import torch
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokenizer, encoder = self._text.tokenizer, self._text.encoder
        if encoder is None:
            raise RuntimeError("load_text_encoder() must be called before encode_text()")
        if isinstance(captions, str):
            captions = [captions]
        length = self.max_text_length
        inputs = tokenizer(
            [prompt_clean(c) for c in captions],
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = next(encoder.parameters()).device
        ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
        with torch.enable_grad() if grad else torch.no_grad():
            hidden = encoder(ids, mask).last_hidden_state
            seq_lens = mask.gt(0).sum(dim=1)
            # Keep each caption's tokens, zero the rest: the transformer gets no mask, only these zeros.
            keep = torch.arange(length, device=device)[None, :] < seq_lens[:, None]
            embeds = torch.where(keep[:, :, None], hidden, torch.zeros((), dtype=hidden.dtype, device=device))
        return {"prompt_embeds": embeds, "prompt_mask": keep}

    # -- training ----------------------------------------------------------------------------------
    def transformer_names(self) -> tuple[str, ...]:
        return ("transformer", "transformer_2") if self.family in TWO_EXPERTS else ("transformer",)

    @cached_property
    def boundary_ratio(self) -> float | None:
        """Wan 2.2 A14B's own expert boundary, from model_index.json (0.875 T2V, 0.9 I2V)."""
        value = _read_json(self.folder / "model_index.json").get("boundary_ratio")
        return None if value is None else float(value)

    def denoisers(self, boundary: float | None = None) -> list[Denoiser]:
        if self.family not in TWO_EXPERTS:
            return super().denoisers(boundary)
        split = self.boundary_ratio if boundary is None else boundary
        if split is None:
            from core.errors import UserError

            raise UserError(f"{self.folder / 'model_index.json'} has no boundary_ratio; set experts.boundary (0.875 for T2V, 0.9 for I2V)")
        # WanPipeline runs `transformer` while t >= boundary_ratio * 1000, `transformer_2` below.
        return [Denoiser("transformer", "high-noise expert", split, 1.0), Denoiser("transformer_2", "low-noise expert", 0.0, split)]

    def load_transformer(self, name: str, device: torch.device | str, dtype: torch.dtype, checkpoint: str | None = None) -> Any:
        if checkpoint:
            component(self.folder, name)
            transformer = self._load_single_file(name, Path(checkpoint).expanduser(), dtype).requires_grad_(False).eval()
        else:
            transformer = load_frozen_transformer(self.folder, name, "WanTransformer3DModel", dtype)
        _place(transformer, device, dtype)
        return transformer

    def _load_single_file(self, name: str, checkpoint: Path, dtype: torch.dtype) -> Any:
        """A transformer from one .safetensors file (the original release's, ComfyUI's or diffusers' key
        names: diffusers converts), shaped by this folder's transformer config, so nothing is downloaded."""
        from diffusers import WanTransformer3DModel

        from core.errors import ConfigError

        if not checkpoint.is_file():
            raise ConfigError(f"transformer.model_path {checkpoint} does not exist; choose the checkpoint file, or leave it empty", key="transformer.model_path")
        if checkpoint.suffix.lower() != ".safetensors":
            raise ConfigError(f"transformer.model_path {checkpoint} is not a .safetensors file; convert it or choose a .safetensors checkpoint", key="transformer.model_path")
        logger.info("loading the %s from %s (config from %s)", name, checkpoint, self.folder)
        try:
            return WanTransformer3DModel.from_single_file(str(checkpoint), config=str(self.folder), subfolder=name, torch_dtype=dtype)
        except Exception as exc:  # wrong family or size, damaged file: diffusers' reason, on one line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"transformer.model_path {checkpoint} cannot be loaded as the {name} of {self.folder} ({reason[:300]}); "
                "check that the checkpoint and base_model are the same model and size",
                key="transformer.model_path",
                also=("base_model",),
            ) from exc

    def objective(self, config_objective: dict[str, Any]) -> Objective:
        # Every Wan model is a flow-matching model (its scheduler samples with flow sigmas); the
        # timestep's form (per sample, or per token for TI2V-5B) is predict's.
        from .objectives import FlowMatching, configured_weighting

        return FlowMatching(configured_weighting(config_objective))

    def set_frame_local_attention(self, transformer: Any) -> None:
        FrameLocalAttention.install(transformer)

    def quantize_filter(self, part: str, weight_dtype: str) -> LayerFilter:
        from core.memory.quantize import LayerFilter

        if part == "text_encoder":
            # Every Linear of UMT5; for NFLOAT_4 not the feed-forward's `wo`: UMT5 casts its input to
            # wo.weight.dtype, which is uint8 for bitsandbytes' packed weights (transformers' own
            # bitsandbytes loading keeps wo unquantized for the same reason).
            return LayerFilter(self.family, part, r".+", exclude=r".+\.wo" if weight_dtype == "NFLOAT_4" else None)
        if part not in self.transformer_names():
            raise ValueError(f"{self.family} has no quantizable part {part!r}")
        # Every Linear inside WanTransformer3DModel.blocks: about 98% of the weights. The patch
        # embedding, condition embedder, norms and proj_out stay in the compute dtype.
        return LayerFilter(self.family, part, r"blocks\.\d+\..+", setting="transformer.weight_dtype")

    def block_stacks(self, transformer: Any) -> list[Any]:
        return [transformer.blocks]

    def default_lora_targets(self) -> list[str]:
        # Self- and cross-attention projections and the feed-forward layers of every block: what
        # diffusers' and musubi-tuner's Wan LoRAs train, and what ComfyUI's Wan LoRA loader maps.
        return ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ffn.net.0.proj", "ffn.net.2"]

    def comfy_lora_keys(self) -> Any:
        from core.export.comfy_wan import diffusers_to_comfy  # the original Wan code's module names

        return diffusers_to_comfy

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self, denoisers: dict[str, Any], request: SampleRequest, *, device: torch.device | str,
               dtype: torch.dtype) -> Any:
        """A video for the request from the model as it is now: (frames, height, width, 3) uint8.
        An image-to-video model (image_conditioned) also needs `request.image`, a PIL image or an
        (H, W, 3) uint8 array, for its first frame.

        Runs the family's own pipeline (WanPipeline with the folder's scheduler, boundary and
        timestep form) around the given denoisers, trained LoRA layers active; a denoiser not given
        (the untrained expert of a one-expert A14B run) is loaded frozen from the folder. Sizes are
        rounded down to what the model takes (multiples of size_divisor, 4k+1 frames).
        """
        from .wan_sampling import sample_video

        return sample_video(self, denoisers, request, device=device, dtype=dtype)

    @property
    def image_conditioned(self) -> bool:  # type: ignore[override]
        return self.family == "wan22_a14b_i2v"

    def split_latents(self, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.image_conditioned:
            return cached, None
        channels = self.latent_channels
        return cached[:, :channels], cached[:, channels:]

    def _image_condition(self, condition: torch.Tensor) -> torch.Tensor:
        """(B, 4 + z, F, H, W): WanImageToVideoPipeline's first-frame mask (one channel per pixel frame
        of a latent frame: the first latent frame holds the one given picture) before the image latents."""
        import torch

        batch, _, frames, height, width = condition.shape
        mask = torch.zeros(batch, self.temporal_ratio, frames, height, width, dtype=condition.dtype, device=condition.device)
        mask[:, :, 0] = 1.0
        return torch.cat([mask, condition], dim=1)

    @property
    def image_to_video(self) -> bool:  # type: ignore[override]
        return self.family == "wan22_ti2v_5b"

    def predict(
        self, transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, batch: dict[str, Any],
        first_frame_fixed: torch.Tensor | None = None, condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        import torch

        from .objectives import expanded_timesteps, model_timesteps

        if self.image_conditioned:
            if condition is None:
                raise ValueError(f"{self.family} needs the image condition (split_latents) to predict")
            # As WanImageToVideoPipeline: noisy latents, then the mask and the image's latents.
            noisy = torch.cat([noisy, self._image_condition(condition).to(noisy.dtype)], dim=1)

        if self.family == "wan22_ti2v_5b":
            # TI2V-5B takes one timestep per latent token (WanPipeline's expand_timesteps); the
            # tokens of a conditioning first frame get timestep 0.
            fixed = False if first_frame_fixed is None else first_frame_fixed
            timestep = expanded_timesteps(sigmas, tuple(noisy.shape), tuple(transformer.config.patch_size), fixed)
        elif first_frame_fixed is not None and bool(first_frame_fixed.any()):
            raise ValueError(f"{self.family} has no first-frame conditioning")
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
