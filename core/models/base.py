"""The model adapter interface: everything the trainer needs from a model family, behind one class.

The trainer never branches on the model type; it asks the adapter. This first part covers what
caching needs: loading the VAE and the text encoder alone (never the transformer), encoding clips
and captions into what the transformer consumes, the sizes that buckets are rounded to, and stable
identities of the encoders so cache keys change when, and only when, an encoder changes.

torch is imported lazily (only for type hints here), so computing an identity stays light.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .frame_rule import FrameRule

if TYPE_CHECKING:
    import torch

    from core.memory.quantize import LayerFilter

    from .conditions import ConditionSpec
    from .objectives import Objective


@dataclass(frozen=True)
class Denoiser:
    """One trainable denoiser and the noise levels it serves: s in [low, high] on the objective's
    noise-level axis (for flow matching the sigma, the timestep / 1000). A one-transformer model has
    one over [0, 1]."""

    name: str  # the pipeline component: "transformer", "transformer_2"
    role: str  # what users call it: "transformer", "high-noise expert", "low-noise expert"
    low: float
    high: float


@dataclass(frozen=True)
class SampleRequest:
    """One sample to make with a family's pipeline: what is asked for, whatever the family."""

    prompt: str
    width: int
    height: int
    frames: int
    steps: int
    guidance_scale: float
    seed: int
    negative_prompt: str = ""
    image: Any = None  # the first frame for an image_conditioned model: a PIL image or (H, W, 3) uint8


class ModelAdapter(ABC):
    """One model family. Subclasses are constructed from a local diffusers model folder.

    Attributes a subclass sets: family (e.g. "wan21"), max_text_length (text tokens per caption),
    and where it has other text encoders than one `text_encoder`, text_encoder_names and
    placeholder_encoders (core/models/conditions.py).
    """

    family: str
    max_text_length: int
    # The tokenizer/encoder pairs by component name, which is also each one's settings section
    # (weight_dtype, train, learning_rate): ("text_encoder", "text_encoder_2") for a family with two.
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    # The encoders textual inversion adds its placeholder tokens to (those whose tokens the captions reach).
    placeholder_encoders: tuple[str, ...] = ("text_encoder",)

    # The training methods this adapter is built and tested for; core/train/support.py refuses the
    # others by name (training_method) before any work.
    training_methods: tuple[str, ...] = ("LORA", "FINE_TUNE", "EMBEDDING")
    # The text encoders FINE_TUNE can train (their section's train); None: all of text_encoder_names.
    # Another one's train is refused by name.
    finetune_text_encoders: tuple[str, ...] | None = None
    # Whether the denoiser takes a distilled-guidance input, which transformer.guidance_scale sets in
    # training; for one without, a guidance_scale other than the default is refused by name.
    guidance_distilled: bool = False
    # Whether the denoiser routes tokens through a mixture of experts whose gates compute a
    # load-balancing loss (auxiliary_loss); for one without, transformer.moe_aux_loss_weight other
    # than 0 is refused by name.
    mixture_of_experts: bool = False
    # The text encoders that can stay loaded through training and encode each batch's captions
    # (encode_kept_text) instead of having their outputs cached: those whose section's keep_loaded
    # setting is on, kept_text_encoders, are (configure).
    live_text_encoders: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A family that lets an encoder stay loaded must encode with it: said when the class is made,
        # not in the middle of a run.
        if cls.live_text_encoders and cls.encode_kept_text is ModelAdapter.encode_kept_text:
            raise TypeError(f"{cls.__name__} declares live_text_encoders {cls.live_text_encoders} but no encode_kept_text")

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser().absolute()
        self.kept_text_encoders: tuple[str, ...] = ()

    def configure(self, config: dict[str, Any]) -> None:
        """Take what the family's forward call reads from a run's settings (core.models.registry.adapter_for
        calls it with the run's config): which live_text_encoders stay loaded (their section's
        keep_loaded); a family adds its own (Hunyuan Video: transformer.guidance_scale)."""
        self.kept_text_encoders = tuple(name for name in self.live_text_encoders
                                        if (config.get(name) or {}).get("keep_loaded"))

    @property
    def cached_text_encoders(self) -> tuple[str, ...]:
        """The text encoders whose outputs the text cache holds (encode_text runs them): all but the kept."""
        return tuple(name for name in self.text_encoder_names if name not in self.kept_text_encoders)

    def encode_kept_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The kept text encoders' conditions of a batch's captions, batched as encode_text's, without
        a graph: what the loop and validation add to each batch of cached ones. Nothing here: a family
        with live_text_encoders overrides it (checked in __init_subclass__)."""
        return {}

    @classmethod
    def detect(cls, index: dict[str, Any]) -> str | None:
        """Which of this adapter's families a diffusers folder holds, from its model_index.json (the
        pipeline class, the components, flags such as expand_timesteps); None for none of them. The
        registry asks it where several of its rows share one pipeline class."""
        return None

    # -- sizes --------------------------------------------------------------------------------
    @property
    @abstractmethod
    def spatial_ratio(self) -> int:
        """Pixels per latent cell along height and width (the VAE's spatial compression)."""

    @property
    @abstractmethod
    def temporal_ratio(self) -> int:
        """Pixel frames per latent frame after the first (the VAE's temporal compression)."""

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of the latents encode_video returns."""

    @property
    @abstractmethod
    def size_divisor(self) -> int:
        """What bucket heights and widths are multiples of: VAE compression x transformer patch size."""

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(height, width) in pixels where the denoiser takes one frame size only (positional
        embeddings learned for it): every clip is then scaled and cropped to it, and `resolution`
        is not used. None: any multiple of size_divisor."""
        return None

    def latent_frames(self, frames: int) -> int:
        """Latent frames for a clip of `frames` pixel frames (k * temporal_ratio + 1 -> k + 1)."""
        return (frames - 1) // self.temporal_ratio + 1

    @property
    def frame_rule(self) -> FrameRule:
        """The pixel frame counts the denoiser accepts; the data plan rounds clips down to them.
        By default every count the VAE compresses whole: k * temporal_ratio + 1; a family whose VAE
        round-trips fewer counts narrows it (CogVideoX: 8k + 1)."""
        return FrameRule.latent_multiple(self.temporal_ratio)

    # -- encoders -----------------------------------------------------------------------------
    @abstractmethod
    def load_vae(self, device: torch.device | str, dtype: torch.dtype) -> Any:
        """Load the VAE alone (once; moved if asked again with another device or dtype)."""

    @abstractmethod
    def load_text_encoder(self, device: torch.device | str, dtype: torch.dtype, weight_dtype: str | None = None,
                          *, name: str = "text_encoder") -> Any:
        """Load one tokenizer and text encoder (`name`, one of text_encoder_names) alone (once; moved
        if asked again); returns the encoder. A quantized `weight_dtype` (FLOAT_8, INT_8, INT_4,
        NFLOAT_4) stores its Linear layers quantized; it computes in dtype. All of them at once, each
        as its settings section says: core.models.conditions.load_text_encoders."""

    @abstractmethod
    def text_parts(self) -> dict[str, tuple[Any, Any]]:
        """{name: (tokenizer, text encoder)} for every one of text_encoder_names, in that order, as
        load_text_encoder left them ((None, None) before): what textual inversion adds its tokens
        to and fine-tuning trains."""

    def condition_layout(self) -> dict[str, ConditionSpec]:
        """Every key encode_text returns, with its padding (core/models/conditions.py): which axis of
        the per-sample tensor is padded, or None for a fixed size, and the padding value. The text
        cache and the collate pad each key by this; predict gets the batch with the same keys.
        By default one encoder's prompt_embeds (L, D), zero-padded, and its prompt_mask (L,)."""
        from .conditions import TEXT_LAYOUT

        return dict(TEXT_LAYOUT)

    @abstractmethod
    def unload_encoders(self) -> None:
        """Drop the VAE and the text encoders, so that training with warm caches holds none."""

    def clean_caption(self, caption: str) -> str:
        """A caption as the family's text path cleans it before tokenizing (as is, by default)."""
        return caption

    @abstractmethod
    def vae_identity(self) -> str:
        """A stable string that changes when the VAE's config or weights change."""

    @abstractmethod
    def text_identity(self) -> str:
        """A stable string that changes when any text encoder's or tokenizer's files change."""

    @abstractmethod
    def encode_video(
        self, frames: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """(B, 3, F, H, W) floats in [-1, 1] -> the normalised latents the transformer trains on."""

    @abstractmethod
    def encode_text(self, captions: list[str], grad: bool = False) -> dict[str, torch.Tensor]:
        """Captions -> the condition_layout()'s keys, each batched (B, ...) and padded with its pad
        value, such as {"prompt_embeds": (B, L, D), "prompt_mask": (B, L) bool}, padding zeroed.
        With kept text encoders (configure), the cached encoders' keys only; encode_kept_text gives the rest.

        grad=True runs the encoder with autograd on, so gradients reach trainable token embeddings
        (textual inversion); by default it runs without building a graph."""

    # -- training ---------------------------------------------------------------------------------
    @abstractmethod
    def objective(self, config_objective: dict[str, Any]) -> Objective:
        """What this family learns (core/models/objectives.py): noisy input, target, loss weight and
        timestep input as functions of the noise level s, weighted as the config's objective
        section says (`loss_weighting`; missing keys take the schema's defaults). A weighting the
        objective has no formula for is a ConfigError naming objective.loss_weighting."""

    @abstractmethod
    def transformer_names(self) -> tuple[str, ...]:
        """The trainable denoisers of this model, by component name ("transformer", and
        "transformer_2" for Wan 2.2 A14B's low-noise expert)."""

    def denoisers(self, boundary: float | None = None) -> list[Denoiser]:
        """The denoisers with the noise levels each serves, highest noise first. `boundary` overrides
        a two-expert model's own split; a one-transformer model has no boundary."""
        if boundary is not None:
            raise ValueError("this model has one denoiser, so no boundary")
        return [Denoiser(name, "transformer", 0.0, 1.0) for name in self.transformer_names()]

    @abstractmethod
    def load_transformer(self, name: str, device: torch.device | str, dtype: torch.dtype, checkpoint: str | None = None) -> Any:
        """Load one denoiser (frozen, eval mode) in dtype on device; `checkpoint`, a single-file
        checkpoint to take its weights from instead of the model folder."""

    def load_quantized_transformer(self, name: str, weight_dtype: str, *, cache_dir: str | os.PathLike | None,
                                   work_device: Any = None, checkpoint: str | None = None) -> Any:
        """One denoiser with its blocks' Linear layers quantized to weight_dtype, frozen, on the CPU.

        From the model folder through the quantization cache under cache_dir (core.memory.quantize_cache:
        a later run reads only the quantized weights). A single-file `checkpoint` is loaded and quantized
        every time: the cache's key is the model folder's identity, which says nothing about the
        checkpoint's weights. work_device: where NFLOAT_4 quantizes (a GPU is much faster than a CPU).
        """
        from core.memory.quantize import quantize_model
        from core.memory.quantize_cache import load_quantized_part

        from .dtypes import compute_dtype

        if checkpoint:
            transformer = self.load_transformer(name, "cpu", compute_dtype(weight_dtype), checkpoint)
            quantize_model(transformer, weight_dtype, include=self.quantize_filter(name, weight_dtype), work_device=work_device)
            return transformer
        transformer, _ = load_quantized_part(self.folder, name, weight_dtype, cache_dir=cache_dir,
                                             compute_dtype=compute_dtype(weight_dtype), work_device=work_device,
                                             include=self.quantize_filter(name, weight_dtype))
        return transformer

    # -- memory ---------------------------------------------------------------------------------
    @abstractmethod
    def quantize_filter(self, part: str, weight_dtype: str) -> LayerFilter:
        """The Linear layers of a model part ("transformer", "transformer_2", "text_encoder", ...) that a
        quantized weight_dtype stores quantized (core.memory.quantize.LayerFilter: a name pattern,
        whose identity is part of the quantization cache's key). A filter that matches no layer
        of the loaded part is a ConfigError naming the family, the part and the weight_dtype."""

    @abstractmethod
    def block_stacks(self, transformer: Any) -> list[Any]:
        """The denoiser's stacks of blocks (nn.ModuleLists) in the order its forward runs them; layer
        offloading streams their blocks one by one, layer_offload_fraction counted over all of them."""

    @abstractmethod
    def sample(self, denoisers: dict[str, Any], request: SampleRequest, *, device: torch.device | str,
               dtype: torch.dtype) -> Any:
        """A video for the request from the given denoisers as they are now (LoRA active), with the
        family's pipeline: a (frames, height, width, 3) uint8 numpy array. `request.image` is the
        first frame for an image_conditioned model."""

    # Whether set_frame_local_attention can restrict the denoiser's attention to one latent frame;
    # where it cannot, video_config.use_temporal_attention false is refused by name before any work.
    frame_local_attention: bool = True

    @abstractmethod
    def set_frame_local_attention(self, transformer: Any) -> None:
        """Restrict the denoiser's self-attention to tokens of the same latent frame
        (video_config.use_temporal_attention false)."""

    @abstractmethod
    def default_lora_targets(self) -> list[str]:
        """Module names (suffixes) that get LoRA when lora.target_layers is empty."""

    def comfy_lora_keys(self) -> Any:
        """The family's ComfyUI LoRA key map (core.export.lora.ComfyKeys), or None where ComfyUI has
        no native format for it tested here: output_format COMFY is then refused by name."""
        return None

    @abstractmethod
    def predict(
        self, transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, batch: dict[str, Any],
        first_frame_fixed: torch.Tensor | None = None, condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoiser's prediction for noisy latents at noise levels sigmas (B,) (the axis s of
        objective(): the transformer gets its model_timestep form), conditioned on the batch's
        text conditions (the condition_layout() keys, padded). `first_frame_fixed` (B,) bool marks the samples whose
        first latent frame is the clean conditioning image (only where image_to_video is True);
        `condition` is the image condition of an image_conditioned model (from split_latents)."""

    def auxiliary_loss(self, transformer: Any) -> torch.Tensor | None:
        """A loss term the denoiser computed in the last training-mode predict call, already weighted,
        which the loop adds to the training loss (a mixture of experts' load balancing,
        transformer.moe_aux_loss_weight); None where there is none. Taking it clears it."""
        return None

    # Whether each cached entry carries an image condition after the video latents (an image-to-video
    # model); split_latents separates them and predict takes the condition.
    image_conditioned: bool = False

    def split_latents(self, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(video latents, image condition or None) of a batch of cached entries."""
        return cached, None

    # Whether the text conditions depend on the clip's first frame as well as the caption (an
    # image-to-video model whose text encoder reads the image): encode_text then takes
    # images=[one per caption], and the text cache keeps one entry per clip variant.
    text_takes_image: bool = False

    # Whether the model learns image-to-video from the clip's own first frame, with no extra input
    # (Wan 2.2 TI2V-5B: per-token timesteps let the first frame's tokens be clean).
    image_to_video: bool = False
