"""The random draws of a training step, per sample: noise level, noise, image-to-video or not.

Each sample draws from its own generator, seeded by (seed, batch step, position in the global
batch): a sample gets the same draws whichever process holds it and however many processes share
the batch, so N processes with batch_size B see what one process with batch_size N x B sees, and a
resumed run continues the same sequence.

The noise level is the objective's axis s in [0, 1], whatever the family's objective makes of it
(core/models/objectives.py): the loop hands it to adapter.objective's noisy/target/weight.
"""

from __future__ import annotations

from typing import Any

from core.data.dataset import step_seed

from .objective import sample_sigmas


def sample_noise(shape: Any, positions: list[int], seed: int, step: int, objective: dict[str, Any]) -> tuple[Any, Any]:
    """Noise levels (B,) and noise (B, *shape[1:]) for a batch step's samples at these positions in
    the global batch, each sample from its own generator seeded by (seed, step, position): a sample
    gets the same draws whichever process holds it and however many processes share the batch."""
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(step_seed(seed, step, f"noise:{position}")) for position in positions]
    # Each generator draws its sample's noise level, then its noise, then its offset (the order
    # matters for the numbers; without offset noise nothing is drawn for it, so the rest stays as it
    # was); the noise-level mapping runs once for the batch.
    sigmas = sample_sigmas(len(generators), objective, generators)
    sample_shape = tuple(shape[1:])
    noise = torch.stack([torch.randn(sample_shape, generator=g) for g in generators])
    weight = float(objective.get("offset_noise_weight", 0.0))
    if weight > 0:
        # Offset noise (diffusers' --noise_offset, OneTrainer's offset_noise_weight): one normal draw
        # per latent channel, the same over every frame and pixel of the sample.
        per_channel = (sample_shape[0],) + (1,) * (len(sample_shape) - 1)
        noise = noise + weight * torch.stack([torch.randn(per_channel, generator=g) for g in generators])
    return sigmas, noise


def sample_first_frame_fixed(positions: list[int], seed: int, step: int, share: float) -> Any:
    """(B,) bool: which samples of a batch step learn image-to-video, each drawn with probability
    `share` from its own generator, seeded like its noise (the same with any number of processes)."""
    import torch

    draws = [torch.rand(1, generator=torch.Generator(device="cpu").manual_seed(step_seed(seed, step, f"i2v:{p}")))
             for p in positions]
    return torch.cat(draws) < share
