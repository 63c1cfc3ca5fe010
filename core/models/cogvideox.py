"""The CogVideoX family: CogVideoX-2b, CogVideoX-5b and CogVideoX1.5-5B (text-to-video), CogVideoX-5b-I2V
and CogVideoX1.5-5B-I2V (image-to-video), in diffusers folders.

What differs between the variants comes from the folder's own configs: the 2b has sinusoidal 3D
positional embeddings, the 5b and 1.5 rotary ones (use_rotary_positional_embeddings); the 5b-I2V
also learned positional embeddings for one frame size (fixed_size); 1.5 patches time by
patch_size_t = 2; the image-to-video models take the image latents after the noisy ones on the
channel axis, and 1.5-I2V an ofs embedding.

Frames: the VAE encodes 8k + 1 pixel frames into 2k + 1 latent frames and decodes those back into
8k + 1; other counts do not round-trip (13 frames encode to 4 latents, which decode to 16), so the
frame rule is 8k + 1 for every variant, CogVideo's own (its finetune README and datasets). 1.5's
transformer needs an even latent count: as CogVideo's trainers do (compute_loss), the cache puts a
copy of the first latent frame in front, and CogVideoXPipeline pads the same place when it samples.

Latents: as CogVideoXPipeline decodes them (latents / vae.config.scaling_factor) and CogVideo's own
trainer encodes them (finetune/trainer.py: ``latent_dist.sample() * vae.config.scaling_factor``):
a posterior sample, scaled, seeded for a reproducible cache entry. The VAE works on (B, C, F, H, W)
and the cache keeps that layout; the transformer takes (B, F, C, H, W), so predict permutes in and out.

Text: T5, padded to the transformer's max_text_seq_length (226) and encoded *without* an attention
mask, exactly as CogVideoXPipeline._get_t5_prompt_embeds does; the padded positions keep what T5
makes of its pad tokens (not zeros), and the transformer gets no mask either.

Image-to-video: the image is the clip's first frame, encoded as CogVideoXImageToVideoPipeline.prepare_latents
does (a posterior sample times the scaling factor, or divided by it where vae.config.invert_scale_latents,
1.5), cached after the video's latent frames (split_latents), and given to the transformer padded with
zero frames to the video's length. CogVideo's trainer also adds a little pixel noise to the image
before encoding it each step; here it is encoded once, clean, as the pipeline feeds it when sampling.

The objective is DDPM v-prediction over the folder's own scheduler (core/models/objectives.py), the
model timestep its integer t.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from core.identity import folder_identity

from .base import ModelAdapter, SampleRequest
from .conditions import ConditionSpec
from .frame_rule import FrameRule
from .loading import (
    FrozenTextEncoder,
    component_config,
    config_with_class_defaults,
    load_frozen_transformer,
    load_frozen_vae,
)
from .loading import place as _place
from .loading import read_json as _read_json

if TYPE_CHECKING:
    import torch

    from core.memory.quantize import LayerFilter

    from .objectives import Objective, VPrediction

logger = logging.getLogger(__name__)

COGVIDEOX_FAMILIES = ("cogvideox", "cogvideox_i2v")
PIPELINES = {"CogVideoXPipeline": "cogvideox", "CogVideoXImageToVideoPipeline": "cogvideox_i2v"}
# What CogVideoXImageToVideoPipeline (and CogVideo's trainer) passes as 1.5-I2V's ofs.
OFS = 2.0
# diffusers' train_cogvideox_lora.py and CogVideo's lora trainer: the attention projections.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class CogVideoXAdapter(ModelAdapter):
    """A CogVideoX model in a local diffusers folder (model_index.json, transformer/, vae/,
    text_encoder/, tokenizer/, scheduler/)."""

    # Self-attention over text and video tokens together (the transformer concatenates them), so
    # restricting it to one latent frame is not done here: refused by name (core/train/support.py).
    frame_local_attention = False

    def __init__(self, folder: str | os.PathLike, family: str | None = None) -> None:
        super().__init__(folder)
        if family is None:
            family = self.detect(_read_json(self.folder / "model_index.json"))
        if family not in COGVIDEOX_FAMILIES:
            raise ValueError(f"{family!r} is not a CogVideoX family; expected one of {', '.join(COGVIDEOX_FAMILIES)}")
        self.family = family
        self.max_text_length = int(self.transformer_config.get("max_text_seq_length", 226))
        self._vae: Any = None
        self._text = FrozenTextEncoder(self.folder, "T5EncoderModel")
        self._identities: dict[str, str] = {}
        self._rotary: dict[tuple[Any, ...], Any] = {}

    @classmethod
    def detect(cls, index: dict[str, Any]) -> str | None:
        """CogVideoXPipeline folders are text-to-video, CogVideoXImageToVideoPipeline ones image-to-video."""
        return PIPELINES.get(str(index.get("_class_name", "")))

    # -- configs (read without loading any weights) ---------------------------------------------
    @cached_property
    def transformer_config(self) -> dict[str, Any]:
        return component_config(self.folder, "transformer")

    @cached_property
    def vae_config(self) -> dict[str, Any]:
        """vae/config.json with AutoencoderKLCogVideoX's defaults filled in, as from_pretrained would."""
        return config_with_class_defaults(self.folder, "vae", "AutoencoderKLCogVideoX")

    @property
    def spatial_ratio(self) -> int:
        # CogVideoXPipeline's vae_scale_factor_spatial: one halving per down block after the first.
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def temporal_ratio(self) -> int:
        return int(self.vae_config["temporal_compression_ratio"])

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config["latent_channels"])

    @property
    def patch_size(self) -> int:
        return int(self.transformer_config.get("patch_size", 2))

    @property
    def patch_size_t(self) -> int | None:
        value = self.transformer_config.get("patch_size_t")
        return None if value is None else int(value)

    @property
    def size_divisor(self) -> int:
        return self.spatial_ratio * self.patch_size

    @property
    def frame_rule(self) -> FrameRule:
        # 8k + 1 (1, 9, 17, ..., 49): the counts the VAE decodes back to as many frames (module docstring).
        return FrameRule(step=2 * self.temporal_ratio)

    def latent_frames(self, frames: int) -> int:
        count = super().latent_frames(frames)
        return count + self._time_padding(count)

    def _time_padding(self, latent_frames: int) -> int:
        """Copies of the first latent frame that make the count a multiple of 1.5's patch_size_t."""
        return -latent_frames % self.patch_size_t if self.patch_size_t else 0

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        # The 5b-I2V learned its positional embeddings for one size; diffusers takes no other.
        if not self.transformer_config.get("use_learned_positional_embeddings"):
            return None
        cells = self.transformer_config
        return int(cells["sample_height"]) * self.spatial_ratio, int(cells["sample_width"]) * self.spatial_ratio

    @property
    def image_conditioned(self) -> bool:  # type: ignore[override]
        return self.family == "cogvideox_i2v"

    # -- identities ------------------------------------------------------------------------------
    def vae_identity(self) -> str:
        if "vae" not in self._identities:
            # What else shapes a cache entry: 1.5's leading copy and the image latents after the video's.
            self._identities["vae"] = folder_identity(
                "cogvideox-vae", self.folder / "vae",
                extra={"time_patch": self.patch_size_t or 1, "image": self.image_conditioned, "frames": "8k+1"},
            )
        return self._identities["vae"]

    def text_identity(self) -> str:
        if "text" not in self._identities:
            self._identities["text"] = folder_identity(
                "cogvideox-text", self.folder / "text_encoder", self.folder / "tokenizer",
                extra={"max_text_length": self.max_text_length},
            )
        return self._identities["text"]

    # -- loading ---------------------------------------------------------------------------------
    def load_vae(self, device: torch.device | str, dtype: torch.dtype) -> Any:
        if self._vae is None:
            self._vae = load_frozen_vae(self.folder, "AutoencoderKLCogVideoX", dtype)
        _place(self._vae, device, dtype)
        return self._vae

    def load_text_encoder(self, device: torch.device | str, dtype: torch.dtype, weight_dtype: str | None = None,
                          *, name: str = "text_encoder") -> Any:
        if name != "text_encoder":
            raise ValueError(f"{self.family} has one text encoder, text_encoder; there is no {name!r}")
        return self._text.load(device, dtype, weight_dtype, lambda dtype_name: self.quantize_filter("text_encoder", dtype_name))

    def text_parts(self) -> dict[str, tuple[Any, Any]]:
        return {"text_encoder": (self._text.tokenizer, self._text.encoder)}

    def condition_layout(self) -> dict[str, ConditionSpec]:
        # T5's (226, D) embeddings, the pad tokens' positions included (they are not zero, so the
        # cache keeps all 226 and padding never applies); no mask: the transformer takes none.
        return {"prompt_embeds": ConditionSpec(0, 0.0)}

    def unload_encoders(self) -> None:
        self._vae = None
        self._text.unload()

    # -- encoding --------------------------------------------------------------------------------
    def encode_video(
        self, frames: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> float32 (B, 16, latent_frames(F), H/8, W/8): a posterior sample
        times vae.config.scaling_factor (seed 0 when no generator, so it is reproducible either way),
        1.5's first latent frame repeated in front; an image-to-video model's image latents follow
        as one more frame (split_latents)."""
        import torch

        if self._vae is None:
            raise RuntimeError("load_vae() must be called before encode_video()")
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"expected frames of shape (B, 3, F, H, W), got {tuple(frames.shape)}")
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        param = next(self._vae.parameters())
        scale = float(self._vae.config.scaling_factor)
        with torch.no_grad():
            dist = self._vae.encode(frames.to(device=param.device, dtype=param.dtype)).latent_dist
            latents = dist.sample(generator=generator).float() * scale
            padding = self._time_padding(latents.shape[2])
            if padding:
                latents = torch.cat([latents[:, :, :1].expand(-1, -1, padding, -1, -1), latents], dim=2)
            if not self.image_conditioned:
                return latents
            # CogVideoXImageToVideoPipeline.prepare_latents: the first picture alone through the VAE.
            image = self._vae.encode(frames[:, :, :1].to(device=param.device, dtype=param.dtype)).latent_dist
            image = image.sample(generator=generator).float()
            image = image / scale if self._vae.config.invert_scale_latents else image * scale
        return torch.cat([latents, image], dim=2)

    def encode_text(self, captions: list[str], grad: bool = False) -> dict[str, torch.Tensor]:
        """As CogVideoXPipeline._get_t5_prompt_embeds: pad to max_text_length, encode without a mask."""
        import torch

        tokenizer, encoder = self._text.tokenizer, self._text.encoder
        if encoder is None:
            raise RuntimeError("load_text_encoder() must be called before encode_text()")
        if isinstance(captions, str):
            captions = [captions]
        inputs = tokenizer(
            list(captions), padding="max_length", max_length=self.max_text_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        device = next(encoder.parameters()).device
        with torch.enable_grad() if grad else torch.no_grad():
            embeds = encoder(inputs.input_ids.to(device))[0]
        return {"prompt_embeds": embeds}

    # -- training ----------------------------------------------------------------------------------
    def transformer_names(self) -> tuple[str, ...]:
        return ("transformer",)

    def load_transformer(self, name: str, device: torch.device | str, dtype: torch.dtype, checkpoint: str | None = None) -> Any:
        if name != "transformer":
            raise ValueError(f"{self.family} has one transformer; there is no {name!r}")
        if checkpoint:
            from core.errors import ConfigError

            # diffusers has no single-file loader for CogVideoXTransformer3DModel.
            raise ConfigError(f"transformer.model_path: CogVideoX loads its transformer from the diffusers folder only, "
                              f"not from {checkpoint}; leave it empty", key="transformer.model_path")
        transformer = load_frozen_transformer(self.folder, name, "CogVideoXTransformer3DModel", dtype)
        _place(transformer, device, dtype)
        return transformer

    def _scheduler_config(self) -> dict[str, Any]:
        return _read_json(self.folder / "scheduler" / "scheduler_config.json")

    def objective(self, config_objective: dict[str, Any]) -> Objective:
        from .objectives import VPrediction, configured_weighting

        return VPrediction.from_config(self._scheduler_config(), configured_weighting(config_objective))

    @cached_property
    def _timesteps(self) -> VPrediction:
        """The objective's s -> t mapping for predict (the same scheduler config as objective())."""
        from .objectives import VPrediction

        return VPrediction.from_config(self._scheduler_config())

    def set_frame_local_attention(self, transformer: Any) -> None:
        from core.errors import ConfigError

        raise ConfigError("video_config.use_temporal_attention: CogVideoX cannot restrict its attention to one "
                          "frame here (text and video tokens attend jointly); turn it on", key="video_config.use_temporal_attention")

    def quantize_filter(self, part: str, weight_dtype: str) -> LayerFilter:
        from core.memory.quantize import LayerFilter

        if part == "text_encoder":
            # Every Linear of T5; for NFLOAT_4 not the feed-forward's `wo`: T5's DenseReluDense casts its
            # input to wo.weight.dtype, uint8 for bitsandbytes' packed weights (as in UMT5).
            return LayerFilter(self.family, part, r".+", exclude=r".+\.wo" if weight_dtype == "NFLOAT_4" else None)
        if part != "transformer":
            raise ValueError(f"{self.family} has no quantizable part {part!r}")
        # Every Linear inside transformer_blocks; patch embedding, time embedding, norms and proj_out stay.
        return LayerFilter(self.family, part, r"transformer_blocks\.\d+\..+", setting="transformer.weight_dtype")

    def block_stacks(self, transformer: Any) -> list[Any]:
        return [transformer.transformer_blocks]

    def default_lora_targets(self) -> list[str]:
        return list(LORA_TARGETS)

    def rotary_embeddings(self, transformer: Any, latent_frames: int, latent_height: int, latent_width: int,
                          device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The 3D rotary embeddings for latents of this size, built by CogVideoXPipeline's own
        _prepare_rotary_positional_embeddings (for pixel sizes latent size x spatial ratio); None for
        a transformer without them (the 2b). Kept per size and device: the same for every step."""
        if not transformer.config.use_rotary_positional_embeddings:
            return None
        key = (latent_frames, latent_height, latent_width, str(device))
        config = transformer.config
        if config.patch_size_t is not None and (latent_height > config.sample_height or latent_width > config.sample_width):
            # 1.5 slices its rotary tables from the size it was trained at; beyond it diffusers fails in torch.cat.
            from core.errors import UserError

            raise UserError(f"CogVideoX 1.5 takes frames of at most {config.sample_height * self.spatial_ratio}x"
                            f"{config.sample_width * self.spatial_ratio} pixels (height x width); lower the resolution")
        if key not in self._rotary:
            from diffusers import CogVideoXPipeline

            owner = SimpleNamespace(transformer=transformer, vae_scale_factor_spatial=self.spatial_ratio)
            self._rotary[key] = CogVideoXPipeline._prepare_rotary_positional_embeddings(
                owner, latent_height * self.spatial_ratio, latent_width * self.spatial_ratio, latent_frames, device)
        return self._rotary[key]

    def split_latents(self, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cache entry's video latents and, for image-to-video, its last frame: the image latents."""
        if not self.image_conditioned:
            return cached, None
        return cached[:, :, :-1], cached[:, :, -1:]

    def predict(
        self, transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, batch: dict[str, Any],
        first_frame_fixed: torch.Tensor | None = None, condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, C, F, H, W) noisy latents -> the v prediction in the same layout. The transformer gets
        (B, F, C, H, W) (image-to-video: the image latents padded with zero frames after them on the
        channel axis, and 1.5's ofs), the int64 timestep t of the objective and the pipeline's rotary
        embeddings."""
        import torch

        if first_frame_fixed is not None and bool(first_frame_fixed.any()):
            raise ValueError(f"{self.family} has no first-frame conditioning")
        batch_size, _, frames, height, width = noisy.shape
        dtype = transformer.patch_embed.proj.weight.dtype
        hidden = noisy.permute(0, 2, 1, 3, 4).to(dtype)
        ofs = None
        if self.image_conditioned:
            if condition is None:
                raise ValueError(f"{self.family} needs the image latents (split_latents) to predict")
            image = torch.cat([condition, condition.new_zeros(batch_size, condition.shape[1], frames - 1, height, width)], dim=2)
            hidden = torch.cat([hidden, image.permute(0, 2, 1, 3, 4).to(dtype)], dim=2)
            if transformer.config.ofs_embed_dim is not None:
                ofs = noisy.new_full((batch_size,), OFS)
        timestep = self._timesteps.timesteps(sigmas).to(noisy.device)
        rotary = self.rotary_embeddings(transformer, frames, height, width, noisy.device)
        out = transformer(
            hidden_states=hidden,
            encoder_hidden_states=batch["prompt_embeds"].to(dtype),
            timestep=timestep,
            ofs=ofs,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4)

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self, denoisers: dict[str, Any], request: SampleRequest, *, device: torch.device | str,
               dtype: torch.dtype) -> Any:
        """A video from CogVideoXPipeline (image-to-video: CogVideoXImageToVideoPipeline, starting from
        request.image) around the given transformer as it is (LoRA active): (frames, height, width, 3)
        uint8. Sizes round down to what the model takes; a fixed_size model makes its own size."""
        from .cogvideox_sampling import sample_video

        return sample_video(self, denoisers, request, device=device, dtype=dtype)
