"""The hand-written side of benchmarks/engine_step.py: per model family, one LoRA training step written
with diffusers, peft and torch directly, as a training script would have it, and the engine settings
that make the engine's step do the same work.

Common to every family: FLOAT_32, LoRA rank 8 / alpha 8 on the adapter's default targets
(transformer.add_adapter with peft's LoraConfig, weights cast to float32), batches of 2, backward,
clipping to a total norm of 1.0, AdamW (weight decay 0.01), and reading the loss back as a number.
What differs is the draw, the noisy input, the forward call and the loss:

- Wan 2.1 (flow matching): the SHIFTED noise-level draw (sigmoid of N(0, 1), flow-shifted by 3),
  x_t = (1 - sigma) x + sigma noise, the velocity target noise - x, plain MSE (loss_weighting NONE).
- CogVideoX (v-prediction, as CogVideo's own trainer, finetune/models/cogvideox_t2v/lora_trainer.py):
  integer timesteps uniform over the schedule, the folder's CogVideoXDDIMScheduler's add_noise, the
  transformer on (B, F, C, H, W) with the T5 embeddings (and the pipeline's rotary embeddings where
  the model has them), then the x0 estimate scheduler.get_velocity(v_pred, x_t, t) against x0 with
  weight 1 / (1 - alphas_cumprod[t]). That is what the "#cogvideox LoRA" presets train
  (timestep_distribution UNIFORM, loss_weighting SNR), and VPrediction.loss_pair computes the same.

Each hand loop's step may be given the draws (noise and noise levels) instead of drawing them, so
that engine_step.py can check it against the engine's first step on the same batch.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

from core.config import load_preset, resolve
from core.models.cogvideox import CogVideoXAdapter
from core.models.objectives import FlowMatching, Objective, VPrediction
from core.models.wan import WanAdapter

LR = 1e-4
SHIFT = 3.0
RANK = ALPHA = 8
BATCH = 2
SEED = 42

Draws = tuple[torch.Tensor, torch.Tensor]  # noise in the cache's (B, C, F, H, W), the family's noise levels


class HandLoop(ABC):
    """What every family's hand loop shares: the LoRA, the optimizer, the backward half of the step
    and the timers. A family says how its transformer loads and how the loss is made."""

    family: ClassVar[str]  # core.models.tiny's name for the tiny model
    preset: ClassVar[str]  # the engine's preset the benchmark starts from
    adapter_class: ClassVar[type[Any]]  # the engine's adapter (for its LoRA targets, and --parts)
    objective_class: ClassVar[type[Objective]]  # the engine's objective (for --parts)
    engine_objective: ClassVar[dict[str, Any]]  # the engine's objective section that does this loop's work

    def __init__(self, model_dir: Path, parts: dict[str, list[float]] | None = None) -> None:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        transformer = self.load_transformer(model_dir)
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights=True,
                                           target_modules=self.adapter_class(model_dir).default_lora_targets()))
        cast_training_params(transformer, dtype=torch.float32)
        self.transformer = transformer.train()
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=1e-2)
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.parts = parts

    @abstractmethod
    def load_transformer(self, model_dir: Path) -> Any:
        """The family's transformer from the tiny model's folder, frozen."""

    @abstractmethod
    def loss(self, batch: dict[str, Any], step: int, draws: Draws | None, since: float) -> tuple[torch.Tensor, float]:
        """The step's loss (a float32 scalar with its graph) and the time _mark last returned."""

    @staticmethod
    def levels(objective: Objective, sigmas: torch.Tensor) -> torch.Tensor:
        """The engine's noise levels s (B,) as this loop draws them (for the equality check)."""
        return sigmas

    def _mark(self, name: str, since: float) -> float:
        now = time.perf_counter()
        if self.parts is not None:
            self.parts.setdefault(name, []).append(now - since)
        return now

    def step(self, batch: dict[str, Any], step: int, draws: Draws | None = None) -> float:
        """One training step on the batch; its loss as a number. Draws from a generator seeded by
        the step unless given the draws."""
        started, started_cpu = time.perf_counter(), time.process_time()
        loss, t = self.loss(batch, step, draws, started)
        loss.backward()
        t = self._mark("backward", t)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        t = self._mark("clip_grad_norm_", t)
        self.optimizer.step()
        t = self._mark("optimizer step", t)
        self.optimizer.zero_grad(set_to_none=True)
        t = self._mark("zero_grad", t)
        value = loss.item()
        self._mark("loss.item()", t)
        self.wall.append(time.perf_counter() - started)
        self.cpu.append(time.process_time() - started_cpu)
        return value


class WanHandLoop(HandLoop):
    """Wan 2.1, flow matching: SD3's logit-normal draw, shifted; MSE against noise - x0."""

    family = "wan21"
    preset = "#demo tiny wan LoRA"
    adapter_class = WanAdapter
    objective_class = FlowMatching
    engine_objective = {"timestep_distribution": "SHIFTED", "timestep_shift": SHIFT, "sigmoid_scale": 1.0,
                        "min_timestep": 0.0, "max_timestep": 1.0, "loss_weighting": "NONE"}

    def __init__(self, model_dir: Path, parts: dict[str, list[float]] | None = None) -> None:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        super().__init__(model_dir, parts)
        self.density = compute_density_for_timestep_sampling

    def load_transformer(self, model_dir: Path) -> Any:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=torch.float32)

    def loss(self, batch: dict[str, Any], step: int, draws: Draws | None, since: float) -> tuple[torch.Tensor, float]:
        latents, embeds = batch["latents"], batch["prompt_embeds"]
        if draws is None:
            generator = torch.Generator().manual_seed(SEED * 1_000_003 + step)
            u = self.density("logit_normal", latents.shape[0], logit_mean=0.0, logit_std=1.0, generator=generator)
            sigmas = SHIFT * u / (1 + (SHIFT - 1) * u)
            noise = torch.randn(latents.shape, generator=generator)
        else:
            noise, sigmas = draws
        t = self._mark("noise and noise levels", since)
        s = sigmas.view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        t = self._mark("noisy input", t)
        prediction = self.transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=embeds,
                                      return_dict=False)[0]
        t = self._mark("forward", t)
        loss = torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())
        return loss, self._mark("loss", t)


class CogVideoXHandLoop(HandLoop):
    """CogVideoX, v-prediction with CogVideo's loss form (see the module docstring)."""

    family = "cogvideox"
    preset = "#cogvideox LoRA"
    adapter_class = CogVideoXAdapter
    objective_class = VPrediction
    engine_objective = {"timestep_distribution": "UNIFORM", "min_timestep": 0.0, "max_timestep": 1.0,
                        "loss_weighting": "SNR"}

    def __init__(self, model_dir: Path, parts: dict[str, list[float]] | None = None) -> None:
        from diffusers import CogVideoXDDIMScheduler

        super().__init__(model_dir, parts)
        self.scheduler = CogVideoXDDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.vae_scale_factor_spatial = 2 ** (len(CogVideoXAdapter(model_dir).vae_config["block_out_channels"]) - 1)
        self._rotary: dict[tuple[int, int, int], Any] = {}

    def load_transformer(self, model_dir: Path) -> Any:
        from diffusers import CogVideoXTransformer3DModel

        return CogVideoXTransformer3DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=torch.float32)

    @staticmethod
    def levels(objective: Objective, sigmas: torch.Tensor) -> torch.Tensor:
        assert isinstance(objective, VPrediction)
        return objective.timesteps(sigmas)

    def rotary(self, frames: int, height: int, width: int) -> Any:
        """CogVideoXPipeline's rotary embeddings for latents of this size (None without them, as for the
        tiny 2b layout), built once per size as a training script would."""
        if not self.transformer.config.use_rotary_positional_embeddings:
            return None
        if (frames, height, width) not in self._rotary:
            from diffusers import CogVideoXPipeline

            # The pipeline method reads only self.transformer and self.vae_scale_factor_spatial.
            self._rotary[frames, height, width] = CogVideoXPipeline._prepare_rotary_positional_embeddings(
                self, height * self.vae_scale_factor_spatial, width * self.vae_scale_factor_spatial, frames,
                torch.device("cpu"))
        return self._rotary[frames, height, width]

    def loss(self, batch: dict[str, Any], step: int, draws: Draws | None, since: float) -> tuple[torch.Tensor, float]:
        # The transformer's layout from the start, as CogVideo's trainer permutes its cached latents.
        latents = batch["latents"].permute(0, 2, 1, 3, 4)  # (B, F, C, H, W)
        embeds = batch["prompt_embeds"]
        if draws is None:
            generator = torch.Generator().manual_seed(SEED * 1_000_003 + step)
            timesteps = torch.randint(0, self.num_timesteps, (latents.shape[0],), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
        else:
            noise, timesteps = draws[0].permute(0, 2, 1, 3, 4), draws[1]
        t = self._mark("noise and timesteps", since)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        t = self._mark("noisy input", t)
        _, frames, _, height, width = noisy.shape
        v_pred = self.transformer(hidden_states=noisy, encoder_hidden_states=embeds, timestep=timesteps,
                                  image_rotary_emb=self.rotary(frames, height, width), return_dict=False)[0]
        t = self._mark("forward", t)
        x0_pred = self.scheduler.get_velocity(v_pred, noisy, timesteps)  # alpha_t x_t - sigma_t v_pred
        # alphas_cumprod is float64; CogVideo's trainer lets the weight promote the whole loss to
        # float64. Rounded to float32 once here, as the engine does, so both sides do float32 work.
        weights = (1 / (1 - self.scheduler.alphas_cumprod[timesteps])).float().view(-1, 1, 1, 1, 1)
        loss = (weights * (x0_pred - latents) ** 2).mean()
        return loss, self._mark("loss", t)


def engine_config(case: type[HandLoop], work: Path, model: Path, clip: Path, steps: int, name: str) -> dict[str, Any]:
    """The engine's configuration for this family's hand loop: the preset the family's users start
    from, with everything the hand loop does set to the same (the rest is off: samples, backups,
    validation, warm-up)."""
    return resolve(
        load_preset(case.preset),
        {
            "base_model": str(model),
            "datasets": [{"path": str(clip), "repeats": BATCH}],  # one batch of 2 per pass
            "workspace_dir": str(work / name / "workspace"),
            "cache_dir": str(work / "cache"),
            "output_path": str(work / name / "lora.safetensors"),
            "train_dtype": "FLOAT_32",
            "transformer": {"weight_dtype": "FLOAT_32"},
            "text_encoder": {"weight_dtype": "FLOAT_32"},
            "vae": {"weight_dtype": "FLOAT_32"},
            "gradient_checkpointing": "OFF",
            "resolution": 64,
            "frames": 9,
            "batch_size": BATCH,
            "video_config": {"video_batch_size_multiplier": 1.0, "temporal_consistency_weight": 0.0, "max_frames": 9,
                             "target_fps": 16.0},
            "objective": case.engine_objective,
            "lora": {"rank": RANK, "alpha": float(ALPHA), "dropout": 0.0, "target_layers": []},
            "optimizer": "ADAMW",
            "learning_rate": LR,
            "lr_scheduler": "CONSTANT",
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
            "seed": SEED,
            "max_steps": steps,
            "dataloader_threads": 0,
            "sampling": {"every_n_steps": 0},
            "backup": {"every_n_steps": 0},
            "validation": {"every_n_steps": 0},
        },
    )


CASES: dict[str, type[HandLoop]] = {case.family: case for case in (WanHandLoop, CogVideoXHandLoop)}
