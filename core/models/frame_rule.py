"""Which pixel frame counts a model family's denoiser accepts (ModelAdapter.frame_rule).

A video VAE with temporal compression r turns 1 + k*r pixel frames into 1 + k latent frames, so
most families accept 1, 1 + r, 1 + 2r, ... (Wan, Hunyuan Video: 4k + 1). A VAE that round-trips
fewer counts narrows that: CogVideoX's decodes 2k + 1 latent frames back into 8k + 1 pixel frames
but an even count into more frames than were encoded, so CogVideoX takes 8k + 1. A rule may also
start above 1 (latent_multiple: latent counts a multiple of m, for a transformer that patches time
and pads nothing). The data plan rounds each clip's frame count down to an accepted one
(core/data/frames.py), so no frame is invented.

No torch here: the data plan uses it while planning, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FrameRule:
    """Accepted pixel frame counts: first, first + step, first + 2*step, ...; and 1 (a still image,
    one latent frame) when single_frame."""

    step: int
    first: int = 1
    single_frame: bool = True
    # One frame only: an image model (FrameRule.still()); the data plan leaves video clips out by name.
    stills_only: bool = False

    def __post_init__(self) -> None:
        if self.step < 1 or self.first < 1:
            raise ValueError(f"a frame rule needs step >= 1 and first >= 1, not {self.step} and {self.first}")

    @classmethod
    def latent_multiple(cls, temporal_ratio: int, multiple: int = 1) -> FrameRule:
        """Pixel frames whose latent frame count ((n - 1) / temporal_ratio + 1) is a multiple of `multiple`."""
        r, m = max(1, int(temporal_ratio)), max(1, int(multiple))
        return cls(step=r * m, first=1 + r * (m - 1), single_frame=m == 1)

    @classmethod
    def still(cls) -> FrameRule:
        """An image model's rule: one frame, nothing else."""
        return cls(step=1, first=1, single_frame=True, stills_only=True)

    def accepts(self, frames: int) -> bool:
        if self.stills_only:
            return frames == 1
        if frames == 1 and self.single_frame:
            return True
        return frames >= self.first and (frames - self.first) % self.step == 0

    def round_down(self, frames: int) -> int | None:
        """The largest accepted count not above `frames`, or None when there is none."""
        if self.stills_only:
            return 1 if frames >= 1 else None
        if frames >= self.first:
            return frames - (frames - self.first) % self.step
        return 1 if frames >= 1 and self.single_frame else None

    def describe(self) -> str:
        """The accepted counts for a message: '1, 5, 9, 13, ... (4k + 1)'."""
        if self.stills_only:
            return "1 (a still image)"
        if self.step == 1:
            return f"any count from {1 if self.single_frame else self.first}"
        counts = [self.first + i * self.step for i in range(4)]
        if self.single_frame and self.first != 1:
            counts = [1, *counts[:3]]
        offset = self.first % self.step
        formula = f"{self.step}k + {offset}" if offset else f"{self.step}k"
        return f"{', '.join(map(str, counts))}, ... ({formula})"
