"""The Hunyuan Video family: text-to-video (HunyuanVideoPipeline folders such as
hunyuanvideo-community/HunyuanVideo), following diffusers' HunyuanVideoPipeline, and image-to-video
(HunyuanVideoImageToVideoPipeline folders such as hunyuanvideo-community/HunyuanVideo-I2V), whose
Llava text encoder and image conditioning hunyuan_video_i2v.py describes.

Latents: as the pipeline decodes them (latents / vae.config.scaling_factor), so the cache holds a
posterior sample times scaling_factor (seeded, so an entry is reproducible), in the VAE's and the
transformer's own (B, C, F, H, W) layout. The VAE compresses 8x in space and 4x in time, so clips
take 4k + 1 frames; the transformer patches 2x2 in space (1 in time): sides are multiples of 16.

Text: hunyuan_video_text.py (the pipelines' encode_prompt).

Caching at real sizes: the VAE encodes with diffusers' tiling and slicing on (load_vae), at the
tile sizes core/memory/known_models.py's VAE_ENCODE_TILES names (diffusers' defaults: 256-pixel
tiles 192 apart; its frame chunks of 16, 12 apart, are on by default). A clip of at most 256 x 256
pixels is one tile and encodes exactly as untiled; a larger one is encoded tile by tile and the
overlaps blended (diffusers' linear cross-fade over the 64-pixel overlaps; tests/test_caching_memory.py
pins it), so one 720p frame chunk needs about as much memory as a 256-pixel one (the estimate's
caching figure counts one tile).

The forward call is the pipeline's: latents as they are, the flow-matching timestep sigma * 1000 as
float32, the mask in the transformer's dtype, the pooled CLIP vector, and the distilled-guidance
input `guidance_scale * 1000` in the transformer's dtype, where guidance_scale is the setting
transformer.guidance_scale in training (configure) and sampling.guidance_scale when sampling.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property
from typing import TYPE_CHECKING, Any

from core.identity import folder_identity
from core.memory.known_models import VAE_ENCODE_TILES

from .base import ModelAdapter, SampleRequest
from .conditions import ConditionSpec
from .hunyuan_video_i2v import CONDITION_TYPES, I2V_PIPELINE, image_embed_interleave
from .hunyuan_video_text import HIDDEN_LAYERS_SKIPPED
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

if TYPE_CHECKING:
    import torch

    from core.memory.quantize import LayerFilter

    from .objectives import Objective

logger = logging.getLogger(__name__)

HUNYUAN_FAMILIES = ("hunyuan_video", "hunyuan_video_i2v")
PIPELINES = {"HunyuanVideoPipeline": "hunyuan_video", I2V_PIPELINE: "hunyuan_video_i2v"}
# HunyuanVideoPipeline.__call__'s max_sequence_length.
MAX_TEXT_LENGTH = 256
# The transformer's two stacks, in the order its forward runs them.
STACKS = ("transformer_blocks", "single_transformer_blocks")
# The attention projections of both stacks, as finetrainers' HunyuanVideo LoRA example targets them
# (examples/training/sft/hunyuan_video/modal_labs_dissolve/train.sh: "(transformer_blocks|
# single_transformer_blocks).*(to_q|to_k|to_v|to_out.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"):
# the video and text streams' q, k, v and outputs of the dual-stream blocks, q, k, v of the
# single-stream ones (whose attention output is fused into proj_out with the MLP's). Not the
# feed-forwards, proj_mlp/proj_out or the modulation; lora.target_layers can add them.
DUAL_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
SINGLE_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v")


class HunyuanVideoAdapter(ModelAdapter):
    """A Hunyuan Video model in a local diffusers folder (model_index.json, transformer/, vae/,
    text_encoder/ + tokenizer/ (Llama), text_encoder_2/ + tokenizer_2/ (CLIP-L), scheduler/)."""

    max_text_length = MAX_TEXT_LENGTH
    text_encoder_names = ("text_encoder", "text_encoder_2")
    placeholder_encoders = ("text_encoder", "text_encoder_2")
    # Text and video tokens attend jointly in both stacks: no frame-local attention.
    frame_local_attention = False

    def __init__(self, folder: str | os.PathLike, family: str | None = None) -> None:
        super().__init__(folder)
        if family is None:
            index = self.folder / "model_index.json"
            family = (self.detect(_read_json(index)) if index.is_file() else None) or "hunyuan_video"
        if family not in HUNYUAN_FAMILIES:
            raise ValueError(f"{family!r} is not a Hunyuan Video family; expected one of {', '.join(HUNYUAN_FAMILIES)}")
        self.family = family
        self.training_guidance = 1.0  # transformer.guidance_scale (configure)
        # enable_tiling's sizes for encoding (and the samples' decoding); the identity of a cache entry.
        self.vae_tiles = dict(VAE_ENCODE_TILES["AutoencoderKLHunyuanVideo"])
        self._vae: Any = None
        self._image_processor: Any = None
        self._text = {
            "text_encoder": FrozenTextEncoder(self.folder, "LlavaForConditionalGeneration" if self.image_conditioned else "LlamaModel"),
            "text_encoder_2": FrozenTextEncoder(self.folder, "CLIPTextModel", subfolder="text_encoder_2",
                                                tokenizer_subfolder="tokenizer_2"),
        }
        self._identities: dict[str, str] = {}

    @classmethod
    def detect(cls, index: dict[str, Any]) -> str | None:
        """HunyuanVideoPipeline folders are text-to-video, HunyuanVideoImageToVideoPipeline ones image-to-video."""
        return PIPELINES.get(str(index.get("_class_name", "")))

    @property
    def image_conditioned(self) -> bool:  # type: ignore[override]
        return self.family == "hunyuan_video_i2v"

    @property
    def text_takes_image(self) -> bool:  # type: ignore[override]
        return self.image_conditioned

    @property
    def training_methods(self) -> tuple[str, ...]:  # type: ignore[override]
        # Text-to-video: LoRA; FINE_TUNE of the transformer (and of either text encoder whose section
        # says train); EMBEDDING with each placeholder in both tokenizers, each encoder its own rows.
        # Image-to-video trains LoRA: its prompt embeddings need the clip's frame, which the live text
        # encoding of fine-tuned encoders and textual inversion does not have.
        return ("LORA",) if self.image_conditioned else ("LORA", "FINE_TUNE", "EMBEDDING")

    @property
    def condition_type(self) -> str | None:
        """The I2V transformer's image_condition_type (token_replace or latent_concat); None for text-to-video."""
        if not self.image_conditioned:
            return None
        value = self.transformer_config.get("image_condition_type")
        if value not in CONDITION_TYPES:
            from core.errors import ConfigError

            raise ConfigError(f"{self.folder / 'transformer' / 'config.json'} has image_condition_type {value!r}; a "
                              f"HunyuanVideo-I2V transformer has one of {', '.join(CONDITION_TYPES)}; re-download the model",
                              key="base_model")
        return str(value)

    @property
    def guidance_distilled(self) -> bool:  # type: ignore[override]
        return bool(self.transformer_config.get("guidance_embeds", True))

    def configure(self, config: dict[str, Any]) -> None:
        super().configure(config)
        transformer = config.get("transformer") or {}
        self.training_guidance = float(transformer.get("guidance_scale", 1.0))

    # -- configs (read without loading any weights) ---------------------------------------------
    @cached_property
    def transformer_config(self) -> dict[str, Any]:
        return component_config(self.folder, "transformer")

    @cached_property
    def vae_config(self) -> dict[str, Any]:
        """vae/config.json with AutoencoderKLHunyuanVideo's defaults filled in, as from_pretrained would."""
        return config_with_class_defaults(self.folder, "vae", "AutoencoderKLHunyuanVideo")

    @cached_property
    def prompt_template(self) -> dict[str, Any]:
        if self.image_conditioned:
            from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE
        else:
            from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        return dict(DEFAULT_PROMPT_TEMPLATE)

    @property
    def spatial_ratio(self) -> int:
        # HunyuanVideoPipeline's vae_scale_factor_spatial.
        return int(self.vae_config["spatial_compression_ratio"])

    @property
    def temporal_ratio(self) -> int:
        return int(self.vae_config["temporal_compression_ratio"])

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config["latent_channels"])

    @property
    def size_divisor(self) -> int:
        return self.spatial_ratio * int(self.transformer_config.get("patch_size", 2))

    # -- identities ------------------------------------------------------------------------------
    def vae_identity(self) -> str:
        if "vae" not in self._identities:
            # The tiles shape the latents of clips larger than one tile.
            # I2V entries carry the image's latents after the clip's (split_latents).
            self._identities["vae"] = folder_identity("hunyuan-video-vae", self.folder / "vae",
                                                      extra={"tiles": self.vae_tiles, "image": self.image_conditioned})
        return self._identities["vae"]

    def text_identity(self) -> str:
        if "text" not in self._identities:
            template = self.prompt_template
            self._identities["text"] = folder_identity(
                "hunyuan-video-text", *(self.folder / name for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")),
                *([self.folder / "image_processor"] if self.image_conditioned else []),
                extra={"template": template["template"], "crop_start": template.get("crop_start"),
                       "length": self.max_text_length, "skipped": HIDDEN_LAYERS_SKIPPED, "padding": "zeroed",
                       "interleave": image_embed_interleave(self.condition_type) if self.image_conditioned else None},
            )
        return self._identities["text"]

    # -- loading ---------------------------------------------------------------------------------
    def load_vae(self, device: torch.device | str, dtype: torch.dtype) -> Any:
        if self._vae is None:
            self._vae = load_frozen_vae(self.folder, "AutoencoderKLHunyuanVideo", dtype)
            tiles = self.vae_tiles
            self._vae.enable_tiling(tiles["height"], tiles["width"], tiles["frames"], tiles["stride_height"],
                                    tiles["stride_width"], tiles["stride_frames"])
            self._vae.enable_slicing()  # a batch of clips encodes one clip at a time
        _place(self._vae, device, dtype)
        return self._vae

    def load_text_encoder(self, device: torch.device | str, dtype: torch.dtype, weight_dtype: str | None = None,
                          *, name: str = "text_encoder") -> Any:
        if name not in self._text:
            raise ValueError(f"{self.family} has the text encoders {', '.join(self._text)}; there is no {name!r}")
        if self.image_conditioned and name == "text_encoder" and self._image_processor is None:
            from transformers import CLIPImageProcessor

            component(self.folder, "image_processor")
            self._image_processor = CLIPImageProcessor.from_pretrained(self.folder, subfolder="image_processor")
        return self._text[name].load(device, dtype, weight_dtype, lambda dtype_name: self.quantize_filter(name, dtype_name))

    def text_parts(self) -> dict[str, tuple[Any, Any]]:
        return {name: (part.tokenizer, part.encoder) for name, part in self._text.items()}

    @property
    def image_processor(self) -> Any:
        """The I2V folder's CLIPImageProcessor (loaded with the text encoder), which prepares the frame for Llava."""
        return self._image_processor

    def condition_layout(self) -> dict[str, ConditionSpec]:
        # Llama's (L, D) embeddings zeroed past the caption and its (L,) mask, both padded on the token
        # axis (they must keep one length); CLIP's pooled (D,) vector has none.
        return {"prompt_embeds": ConditionSpec(0, 0.0), "prompt_attention_mask": ConditionSpec(0, False),
                "pooled_projections": ConditionSpec(None, 0.0)}

    def unload_encoders(self) -> None:
        self._vae = self._image_processor = None
        for part in self._text.values():
            part.unload()

    # -- encoding --------------------------------------------------------------------------------
    def encode_video(
        self, frames: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> float32 (B, 16, (F-1)/4+1, H/8, W/8): a posterior sample times
        vae.config.scaling_factor (seed 0 when no generator, so it is reproducible either way); for
        image-to-video one more frame after them: the first frame's latents as the I2V pipeline's
        prepare_latents makes them (that frame alone through the VAE, its mode times scaling_factor)."""
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
            if not self.image_conditioned:
                return latents
            image = self._vae.encode(frames[:, :, :1].to(device=param.device, dtype=param.dtype)).latent_dist.mode()
        return torch.cat([latents, image.float() * scale], dim=2)

    def split_latents(self, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image-to-video: (the latent frames learned, the image latents). token_replace learns the frames
        after the first (the image's latents take the first place), latent_concat all of the clip's."""
        if not self.image_conditioned:
            return cached, None
        first = 1 if self.condition_type == "token_replace" else 0
        return cached[:, :, first:-1], cached[:, :, -1:]

    def encode_text(self, captions: list[str], grad: bool = False, images: list[Any] | None = None) -> dict[str, torch.Tensor]:
        """As HunyuanVideoPipeline.encode_prompt (module docstring), the padded positions zeroed;
        image-to-video: with each caption's image (its clip's first frame, PIL or (H, W, 3) uint8), as
        HunyuanVideoImageToVideoPipeline.encode_prompt (hunyuan_video_text.py)."""
        from .hunyuan_video_text import llama_conditions, llava_conditions

        captions = [captions] if isinstance(captions, str) else list(captions)
        parts = self.text_parts()
        if any(encoder is None for _, encoder in parts.values()):
            raise RuntimeError("load_text_encoder() must be called for text_encoder and text_encoder_2 before encode_text()")
        if not self.image_conditioned:
            return llama_conditions(parts, captions, self.prompt_template, self.max_text_length, grad)
        if images is None or len(images) != len(captions):
            raise ValueError(f"{self.family} encodes each caption with its clip's first frame: give one image per caption")
        return llava_conditions(parts, self._image_processor, captions, images, self.prompt_template, self.max_text_length,
                                image_embed_interleave(self.condition_type), grad)

    # -- training ----------------------------------------------------------------------------------
    def transformer_names(self) -> tuple[str, ...]:
        return ("transformer",)

    def load_transformer(self, name: str, device: torch.device | str, dtype: torch.dtype, checkpoint: str | None = None) -> Any:
        if name != "transformer":
            raise ValueError(f"{self.family} has one transformer; there is no {name!r}")
        if checkpoint:
            from core.errors import ConfigError

            # diffusers can read the original release's file; not built or tested here yet.
            raise ConfigError(f"transformer.model_path: Hunyuan Video loads its transformer from the diffusers folder "
                              f"only in this version, not from {checkpoint}; leave it empty", key="transformer.model_path")
        transformer = load_frozen_transformer(self.folder, name, "HunyuanVideoTransformer3DModel", dtype)
        _place(transformer, device, dtype)
        return transformer

    @cached_property
    def num_train_timesteps(self) -> int:
        path = self.folder / "scheduler" / "scheduler_config.json"
        return int(_read_json(path).get("num_train_timesteps", 1000)) if path.is_file() else 1000

    def objective(self, config_objective: dict[str, Any]) -> Objective:
        # FlowMatchEulerDiscreteScheduler's flow matching: x_t = (1 - s) x0 + s noise, target noise - x0.
        from .objectives import FlowMatching, configured_weighting

        return FlowMatching(configured_weighting(config_objective), self.num_train_timesteps)

    def set_frame_local_attention(self, transformer: Any) -> None:
        from core.errors import ConfigError

        raise ConfigError("video_config.use_temporal_attention: Hunyuan Video cannot restrict its attention to one "
                          "frame here (text and video tokens attend jointly); turn it on", key="video_config.use_temporal_attention")

    def quantize_filter(self, part: str, weight_dtype: str) -> LayerFilter:
        from core.memory.quantize import LayerFilter

        if part == "text_encoder" and self.image_conditioned:
            # Every Linear of Llava's language model's decoder layers; its vision tower and projector stay.
            return LayerFilter(self.family, part, r"(model\.)?language_model\.(model\.)?layers\.\d+\..+", setting="text_encoder.weight_dtype")
        if part == "text_encoder":
            # Every Linear of Llama's decoder layers; the token embedding and the norms stay.
            return LayerFilter(self.family, part, r"layers\.\d+\..+", setting="text_encoder.weight_dtype")
        if part == "text_encoder_2":
            return LayerFilter(self.family, part, r"(text_model\.)?encoder\.layers\.\d+\..+", setting="text_encoder_2.weight_dtype")
        if part != "transformer":
            raise ValueError(f"{self.family} has no quantizable part {part!r}")
        # Every Linear inside both stacks (attention, feed-forward and the blocks' modulation). The patch
        # embedding, the text embedder with its token refiner, the time, guidance and pooled-vector
        # embedders, norm_out and proj_out stay in the compute dtype, as do all norms and biases.
        return LayerFilter(self.family, part, r"(single_)?transformer_blocks\.\d+\..+", setting="transformer.weight_dtype")

    def block_stacks(self, transformer: Any) -> list[Any]:
        return [getattr(transformer, stack) for stack in STACKS]

    def default_lora_targets(self) -> list[str]:
        # Full names per block: peft matches by suffix, and bare suffixes ("attn.to_q", "proj_out") would
        # also reach the token refiner's attention and the output projection outside the stacks.
        config = self.transformer_config
        dual, single = int(config.get("num_layers", 20)), int(config.get("num_single_layers", 40))
        return ([f"transformer_blocks.{i}.{t}" for i in range(dual) for t in DUAL_LORA_TARGETS]
                + [f"single_transformer_blocks.{i}.{t}" for i in range(single) for t in SINGLE_LORA_TARGETS])

    def comfy_lora_keys(self) -> Any:
        """ComfyUI's native Hunyuan Video names (core/export/comfy_hunyuan_video.py), sized by the
        transformer's config: its fused single-stream linear1 holds q, k, v and the MLP's input."""
        from functools import partial

        from core.export.comfy_hunyuan_video import diffusers_to_comfy

        config = self.transformer_config
        hidden = int(config.get("num_attention_heads", 24)) * int(config.get("attention_head_dim", 128))
        return partial(diffusers_to_comfy, hidden_size=hidden, mlp_width=int(hidden * float(config.get("mlp_ratio", 4.0))))

    def guidance(self, transformer: Any, batch_size: int, scale: float, device: Any) -> torch.Tensor | None:
        """The distilled-guidance input as HunyuanVideoPipeline builds it: scale * 1000 per sample, in the
        transformer's dtype; None for a transformer without a guidance embedder."""
        import torch

        if not transformer.config.guidance_embeds:
            return None
        dtype = transformer.x_embedder.proj.weight.dtype
        return torch.tensor([scale] * batch_size, dtype=dtype, device=device) * 1000.0

    def predict(
        self, transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, batch: dict[str, Any],
        first_frame_fixed: torch.Tensor | None = None, condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, C, F, H, W) noisy latents -> the flow velocity in the same layout, called as
        HunyuanVideoPipeline calls its transformer (module docstring); image-to-video with the image
        latents `condition` as the I2V pipeline puts them (hunyuan_video_i2v.model_input), and for
        token_replace the prediction of the frames after the image's."""
        from .objectives import model_timesteps

        if first_frame_fixed is not None and bool(first_frame_fixed.any()):
            raise ValueError(f"{self.family} has no first-frame conditioning")
        # The Conv3d patch embedding's dtype: the storage dtype of the weights, whatever autocast does.
        dtype = transformer.x_embedder.proj.weight.dtype
        hidden = noisy
        if self.image_conditioned:
            from .hunyuan_video_i2v import model_input

            if condition is None:
                raise ValueError(f"{self.family} needs the image latents (split_latents) to predict")
            hidden = model_input(self.condition_type, noisy, condition)
        out = transformer(
            hidden_states=hidden.to(dtype),
            timestep=model_timesteps(sigmas, self.num_train_timesteps).to(noisy.device),
            encoder_hidden_states=batch["prompt_embeds"].to(dtype),
            encoder_attention_mask=batch["prompt_attention_mask"].to(dtype),
            pooled_projections=batch["pooled_projections"].to(dtype),
            guidance=self.guidance(transformer, noisy.shape[0], self.training_guidance, noisy.device),
            return_dict=False,
        )[0]
        return out[:, :, 1:] if self.condition_type == "token_replace" else out

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self, denoisers: dict[str, Any], request: SampleRequest, *, device: torch.device | str,
               dtype: torch.dtype) -> Any:
        """A video from HunyuanVideoPipeline (image-to-video: HunyuanVideoImageToVideoPipeline, from
        request.image) around the given transformer as it is (LoRA active): (frames, height, width, 3)
        uint8; request.guidance_scale is the pipeline's guidance_scale (the distilled guidance). Sizes
        round down to what the model takes."""
        from .hunyuan_video_sampling import sample_video

        return sample_video(self, denoisers, request, device=device, dtype=dtype)
