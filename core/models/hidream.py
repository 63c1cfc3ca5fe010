"""The HiDream family (HiDream-I1 Full, Dev, Fast), text-to-image, following diffusers' HiDreamImagePipeline.

HiDream is an image model: the adapter's frame rule takes one frame only (FrameRule.still()), a clip
is one latent frame, and `predict` drops the frame axis for the 2D transformer and puts it back.

Latents: as the pipeline decodes them ((latents / scaling_factor) + shift_factor), so the cache holds
(posterior sample - shift_factor) * scaling_factor (seeded, so an entry is reproducible), as diffusers'
train_dreambooth_lora_hidream.py makes them, in a (B, 16, 1, H/8, W/8) layout.

Text, as HiDreamImagePipeline.encode_prompt with its max_sequence_length of 128 (and prompt_2..4 the
same caption, as the pipeline defaults them):
- CLIP-L (text_encoder) and CLIP-G (text_encoder_2), CLIPTextModelWithProjection: the caption padded
  to min(128, 218) tokens, encoded without a mask, the projected pooled output (text_embeds); the two
  concatenated are pooled_embeds (D1 + D2,).
- T5 (text_encoder_3): padded to min(128, model_max_length) tokens, encoded with its attention mask,
  the last hidden state (128, D). The transformer takes no text mask: it attends to all 128 positions,
  padding included, so nothing is zeroed or trimmed (the condition has a fixed size).
- Llama 3.1 (text_encoder_4): padded with eos (the pipeline sets pad_token = eos_token) to
  min(128, model_max_length), encoded with its mask; the pipeline stacks hidden_states[1:] (every
  decoder layer's output) and the transformer reads the layers its config's llama_layers names. Only
  those layers are kept (llama_embeds (n, 128, D), n the distinct llama_layers in ascending order):
  the others are never read, and the full stack of the 8B model is 32 x 128 x 4096 per caption.

The forward call is the pipeline's: timesteps sigma * 1000 (the FlowMatchEulerDiscreteScheduler's t),
and the pipeline negates the transformer's output before the scheduler step (`noise_pred =
-noise_pred`): the transformer predicts x0 - noise, so `predict` returns its negation, the flow
velocity noise - x0 that FlowMatching trains (tests/test_hidream.py pins it against the pipeline's step).

Mixture of experts: diffusers' MoEGate computes an auxiliary load-balancing loss in training mode and
MOEFeedForwardSwiGLU drops it, so it never reaches a loss by itself; the adapter sets every gate's
alpha to transformer.moe_aux_loss_weight at load (0 by default: not computed) and, where it is above 0,
hands the gates' losses to the loop through auxiliary_loss (core/models/hidream_moe.py).
The transformer trains in the class's own training path (routed experts with gradients); diffusers'
DreamBooth script loads it with force_inference_output=True instead, whose routed experts run under
torch.no_grad (moe_infer), which cuts the gradient through them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from functools import cached_property
from typing import TYPE_CHECKING, Any

from core.identity import folder_identity

from .base import ModelAdapter, SampleRequest
from .conditions import ConditionSpec
from .frame_rule import FrameRule
from .hidream_layout import LORA_TARGETS, STACKS, layer_filter, unpatchify_training_output
from .hidream_moe import collected_aux_losses, set_aux_loss_weight
from .hidream_text import LLAMA, MAX_TEXT_LENGTH, encode_clips_and_t5, encode_llama, llama_decoder_class
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

    from .objectives import Objective

logger = logging.getLogger(__name__)

HIDREAM_FAMILIES = ("hidream",)


class HiDreamAdapter(ModelAdapter):
    """A HiDream-I1 model in a local diffusers folder (model_index.json, transformer/, vae/, text_encoder/
    + tokenizer/ (CLIP-L), text_encoder_2/ + tokenizer_2/ (CLIP-G), text_encoder_3/ + tokenizer_3/ (T5),
    text_encoder_4/ + tokenizer_4/ (Llama 3.1), scheduler/)."""

    max_text_length = MAX_TEXT_LENGTH
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
    placeholder_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
    # The Llama's kept layers are 32 MiB per caption in the cache (bfloat16, the released model); kept
    # loaded (text_encoder_4.keep_loaded) it encodes each batch instead.
    live_text_encoders = (LLAMA,)
    # Built and tested here: LoRA and FINE_TUNE of the transformer (a folder HiDreamImagePipeline loads);
    # embeddings and fine-tuning the encoders are refused by name (core/train/support.py).
    training_methods = ("LORA", "FINE_TUNE")
    finetune_text_encoders: tuple[str, ...] = ()
    # Image and text tokens attend jointly, and an image has one frame.
    frame_local_attention = False

    def __init__(self, folder: str | os.PathLike, family: str | None = None) -> None:
        super().__init__(folder)
        family = family or "hidream"
        if family not in HIDREAM_FAMILIES:
            raise ValueError(f"{family!r} is not a HiDream family; expected one of {', '.join(HIDREAM_FAMILIES)}")
        self.family = family
        self._vae: Any = None
        self._text = {
            "text_encoder": FrozenTextEncoder(self.folder, "CLIPTextModelWithProjection"),
            "text_encoder_2": FrozenTextEncoder(self.folder, "CLIPTextModelWithProjection", subfolder="text_encoder_2",
                                                tokenizer_subfolder="tokenizer_2"),
            "text_encoder_3": FrozenTextEncoder(self.folder, "T5EncoderModel", subfolder="text_encoder_3",
                                                tokenizer_subfolder="tokenizer_3"),
            # The decoder alone: the pipeline reads hidden states only, never the LM head's logits
            # (its 128256 x 4096 weights are 1 GB in bf16).
            "text_encoder_4": FrozenTextEncoder(self.folder, llama_decoder_class, subfolder="text_encoder_4",
                                                tokenizer_subfolder="tokenizer_4"),
        }
        self._identities: dict[str, str] = {}
        self.moe_aux_loss_weight = 0.0  # transformer.moe_aux_loss_weight (configure)
        self._aux_loss: Any = None  # the last training forward's, until auxiliary_loss takes it

    def configure(self, config: dict[str, Any]) -> None:
        super().configure(config)  # text_encoder_4.keep_loaded
        self.moe_aux_loss_weight = float((config.get("transformer") or {}).get("moe_aux_loss_weight") or 0.0)

    # -- configs (read without loading any weights) ---------------------------------------------
    @cached_property
    def transformer_config(self) -> dict[str, Any]:
        return component_config(self.folder, "transformer")

    @cached_property
    def vae_config(self) -> dict[str, Any]:
        """vae/config.json with AutoencoderKL's defaults filled in, as from_pretrained would."""
        return config_with_class_defaults(self.folder, "vae", "AutoencoderKL")

    @cached_property
    def llama_layers(self) -> list[int]:
        """The distinct Llama layers the transformer reads (its config's llama_layers), ascending."""
        return sorted({int(k) for k in self.transformer_config.get("llama_layers") or []})

    @property
    def mixture_of_experts(self) -> bool:  # type: ignore[override]
        # diffusers builds MOEFeedForwardSwiGLU (with its gate) only where num_routed_experts > 0.
        return int(self.transformer_config.get("num_routed_experts", 4)) > 0

    @property
    def spatial_ratio(self) -> int:
        # HiDreamImagePipeline's vae_scale_factor: 2 ** (len(block_out_channels) - 1).
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def temporal_ratio(self) -> int:
        return 1

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config["latent_channels"])

    @property
    def size_divisor(self) -> int:
        return self.spatial_ratio * int(self.transformer_config.get("patch_size") or 2)

    @property
    def frame_rule(self) -> FrameRule:
        return FrameRule.still()

    @property
    def max_image_tokens(self) -> int:
        """The transformer's max_seq: max_resolution[0] * max_resolution[1] / patch_size^2 patches."""
        config = self.transformer_config
        rows, cols = config.get("max_resolution") or (128, 128)
        patch = int(config.get("patch_size") or 2)
        return int(rows) * int(cols) // (patch * patch)

    # -- identities ------------------------------------------------------------------------------
    def vae_identity(self) -> str:
        if "vae" not in self._identities:
            self._identities["vae"] = folder_identity("hidream-vae", self.folder / "vae", extra={"latents": "shifted"})
        return self._identities["vae"]

    def text_identity(self) -> str:
        kept = LLAMA in self.kept_text_encoders
        slot = "text-kept" if kept else "text"
        if slot not in self._identities:
            parts = [self.folder / f"{kind}{suffix}" for suffix in ("", "_2", "_3", "_4") for kind in ("text_encoder", "tokenizer")]
            self._identities[slot] = folder_identity(
                # The transformer's llama_layers decide which Llama layers are kept: part of the key,
                # as is whether the entries hold them at all (added only then: older keys stay valid).
                "hidream-text", *parts,
                extra={"length": self.max_text_length, "llama_layers": self.llama_layers, **({"llama_kept": True} if kept else {})},
            )
        return self._identities[slot]

    # -- loading ---------------------------------------------------------------------------------
    def load_vae(self, device: torch.device | str, dtype: torch.dtype) -> Any:
        if self._vae is None:
            self._vae = load_frozen_vae(self.folder, "AutoencoderKL", dtype)
        _place(self._vae, device, dtype)
        return self._vae

    def load_text_encoder(self, device: torch.device | str, dtype: torch.dtype, weight_dtype: str | None = None,
                          *, name: str = "text_encoder") -> Any:
        if name not in self._text:
            raise ValueError(f"{self.family} has the text encoders {', '.join(self._text)}; there is no {name!r}")
        encoder = self._text[name].load(device, dtype, weight_dtype, lambda dtype_name: self.quantize_filter(name, dtype_name))
        if name == "text_encoder_4":
            tokenizer = self._text[name].tokenizer
            tokenizer.pad_token = tokenizer.eos_token  # as HiDreamImagePipeline.__init__ sets it
        return encoder

    def text_parts(self) -> dict[str, tuple[Any, Any]]:
        return {name: (part.tokenizer, part.encoder) for name, part in self._text.items()}

    def condition_layout(self) -> dict[str, ConditionSpec]:
        # All fixed: the transformer attends to every text position, padding included (module docstring).
        layout = {"t5_embeds": ConditionSpec(None, 0.0), "llama_embeds": ConditionSpec(None, 0.0),
                  "pooled_embeds": ConditionSpec(None, 0.0)}
        if LLAMA in self.kept_text_encoders:  # not cached: encode_kept_text gives it per batch
            del layout["llama_embeds"]
        return layout

    def unload_encoders(self) -> None:
        """The VAE and the text encoders, but a kept one (text_encoder_4.keep_loaded), which the steps use."""
        self._vae = None
        for name, part in self._text.items():
            if name not in self.kept_text_encoders:
                part.unload()

    # -- encoding --------------------------------------------------------------------------------
    def encode_video(
        self, frames: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """(B, 3, 1, H, W) in [-1, 1] -> float32 (B, 16, 1, H/8, W/8): (a posterior sample - shift_factor)
        * scaling_factor (seed 0 when no generator, so it is reproducible either way)."""
        import torch

        if self._vae is None:
            raise RuntimeError("load_vae() must be called before encode_video()")
        if frames.ndim != 5 or frames.shape[1] != 3 or frames.shape[2] != 1:
            raise ValueError(f"expected one frame of shape (B, 3, 1, H, W), got {tuple(frames.shape)}")
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        param = next(self._vae.parameters())
        config = self._vae.config
        with torch.no_grad():
            dist = self._vae.encode(frames[:, :, 0].to(device=param.device, dtype=param.dtype)).latent_dist
            latents = (dist.sample(generator=generator).float() - float(config.shift_factor)) * float(config.scaling_factor)
        return latents.unsqueeze(2)

    def encode_text(self, captions: list[str], grad: bool = False) -> dict[str, torch.Tensor]:
        """As HiDreamImagePipeline.encode_prompt (module docstring): every condition_layout() key, so
        without llama_embeds while the Llama is kept (encode_kept_text gives those)."""
        import torch

        captions = [captions] if isinstance(captions, str) else list(captions)
        parts = self.text_parts()
        missing = [name for name in self.cached_text_encoders if parts[name][1] is None]
        if missing:
            raise RuntimeError(f"load_text_encoder() must be called for {', '.join(missing)} before encode_text()")
        with torch.enable_grad() if grad else torch.no_grad():
            encoded = encode_clips_and_t5(parts, captions, self.max_text_length)
            if LLAMA not in self.kept_text_encoders:
                llama = encode_llama(parts[LLAMA], captions, self.max_text_length, self.llama_layers)
                encoded["llama_embeds"] = llama.to(encoded["t5_embeds"].device)
        return encoded

    def encode_kept_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """llama_embeds of the captions from the kept Llama (text_encoder_4.keep_loaded), without a graph."""
        import torch

        if LLAMA not in self.kept_text_encoders:
            return {}
        part = self.text_parts()[LLAMA]
        if part[1] is None:
            raise RuntimeError("load_text_encoder(name='text_encoder_4') must be called before encode_kept_text()")
        with torch.no_grad():
            return {"llama_embeds": encode_llama(part, list(captions), self.max_text_length, self.llama_layers)}

    # -- training ----------------------------------------------------------------------------------
    def transformer_names(self) -> tuple[str, ...]:
        return ("transformer",)

    def load_transformer(self, name: str, device: torch.device | str, dtype: torch.dtype, checkpoint: str | None = None) -> Any:
        if name != "transformer":
            raise ValueError(f"{self.family} has one transformer; there is no {name!r}")
        if checkpoint:
            from core.errors import ConfigError

            raise ConfigError(f"transformer.model_path: HiDream loads its transformer from the diffusers folder "
                              f"only in this version, not from {checkpoint}; leave it empty", key="transformer.model_path")
        transformer = load_frozen_transformer(self.folder, name, "HiDreamImageTransformer2DModel", dtype)
        set_aux_loss_weight(transformer, self.moe_aux_loss_weight)
        _place(transformer, device, dtype)
        return transformer

    def load_quantized_transformer(self, name: str, weight_dtype: str, *, cache_dir: str | os.PathLike | None,
                                   work_device: Any = None, checkpoint: str | None = None) -> Any:
        transformer = super().load_quantized_transformer(name, weight_dtype, cache_dir=cache_dir,
                                                         work_device=work_device, checkpoint=checkpoint)
        set_aux_loss_weight(transformer, self.moe_aux_loss_weight)
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

        raise ConfigError("video_config.use_temporal_attention: HiDream is an image model (one frame, text and image "
                          "tokens attend jointly), so there is nothing to restrict; turn it on",
                          key="video_config.use_temporal_attention")

    def quantize_filter(self, part: str, weight_dtype: str) -> LayerFilter:
        return layer_filter(self.family, part, weight_dtype)

    def block_stacks(self, transformer: Any) -> list[Any]:
        return [getattr(transformer, stack) for stack in STACKS]

    def default_lora_targets(self) -> list[str]:
        # Full names per block, as Hunyuan Video's: nothing outside the two stacks.
        config = self.transformer_config
        double, single = int(config.get("num_layers", 16)), int(config.get("num_single_layers", 32))
        return ([f"double_stream_blocks.{i}.{t}" for i in range(double) for t in LORA_TARGETS]
                + [f"single_stream_blocks.{i}.{t}" for i in range(single) for t in LORA_TARGETS])

    def comfy_lora_keys(self) -> Any:
        """ComfyUI's HiDream names: diffusers' own, prefixed (core/export/comfy_hidream.py)."""
        from core.export.comfy_hidream import diffusers_to_comfy

        return diffusers_to_comfy

    def predict(
        self, transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, batch: dict[str, Any],
        first_frame_fixed: torch.Tensor | None = None, condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, C, 1, H, W) noisy latents -> the flow velocity noise - x0 in the same layout, called as
        HiDreamImagePipeline calls its transformer and negated as it negates the output."""
        from .objectives import model_timesteps

        if first_frame_fixed is not None and bool(first_frame_fixed.any()):
            raise ValueError(f"{self.family} has no first-frame conditioning")
        if noisy.ndim != 5 or noisy.shape[2] != 1:
            raise ValueError(f"{self.family} is an image model: expected latents (B, C, 1, H, W), got {tuple(noisy.shape)}")
        patch = int(transformer.config.patch_size)
        rows, cols = noisy.shape[-2] // patch, noisy.shape[-1] // patch
        if rows * cols > transformer.max_seq:
            from core.errors import ConfigError

            raise ConfigError(f"resolution: {rows * patch * self.spatial_ratio}x{cols * patch * self.spatial_ratio} is "
                              f"{rows * cols} image tokens, more than HiDream's transformer takes ({transformer.max_seq}); "
                              "lower resolution", key="resolution")
        dtype = transformer.x_embedder.proj.weight.dtype
        llama = batch["llama_embeds"].to(dtype).transpose(0, 1)  # (n, B, L, D), as the pipeline's stack
        by_layer: list[Any] = [None] * (max(self.llama_layers) + 1)
        for index, layer in enumerate(self.llama_layers):
            by_layer[layer] = llama[index]
        # The gates compute their loss only in training mode with a weight above 0 (hidream_moe.py).
        collect = transformer.training and self.moe_aux_loss_weight > 0
        with collected_aux_losses(transformer) if collect else contextlib.nullcontext([]) as aux_losses:
            out = transformer(
                hidden_states=noisy[:, :, 0].to(dtype),
                timesteps=model_timesteps(sigmas, self.num_train_timesteps).to(noisy.device),
                encoder_hidden_states_t5=batch["t5_embeds"].to(dtype),
                encoder_hidden_states_llama3=by_layer,
                pooled_embeds=batch["pooled_embeds"].to(dtype),
                return_dict=False,
            )[0]
        self._aux_loss = sum(loss.float() for loss in aux_losses) if aux_losses else None
        if transformer.training and not transformer.config.force_inference_output:
            out = unpatchify_training_output(out, rows, cols, patch)
        return -out.unsqueeze(2)

    def auxiliary_loss(self, transformer: Any) -> torch.Tensor | None:
        """The MoE gates' load-balancing losses of the last training forward, summed (each already times
        transformer.moe_aux_loss_weight, the gates' alpha); None with the weight 0."""
        loss, self._aux_loss = self._aux_loss, None
        return loss

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self, denoisers: dict[str, Any], request: SampleRequest, *, device: torch.device | str,
               dtype: torch.dtype) -> Any:
        """An image from HiDreamImagePipeline around the given transformer as it is (LoRA active):
        (1, height, width, 3) uint8. Sizes round down to what the model takes."""
        from .hidream_sampling import sample_image

        return sample_image(self, denoisers, request, device=device, dtype=dtype)
