"""Sample videos during training: the configured prompts, generated with the model as it is now.

The trainer calls SampleMaker.make() every `sampling.every_n_steps` steps (should_sample) and when the
user asks for samples. Each prompt becomes one H.264 mp4 under workspace_dir/samples/ (one PNG for a
model that makes stills only: its frame rule takes one frame), named by step, index and prompt
(sample_file_name). A sample asked from the window with its own prompt, seed, size, frames and steps
(TrainerCommands.request_sample(SampleRequest)) is made the same way, after the current step, and named
'step-NNNNNN-w<n>-<prompt>' (asked_file_name). Sampling must not change training: no gradients, the modules'
train/eval flags and requires_grad flags are put back exactly, and the global RNG states (torch, CUDA,
numpy, random) are restored, so a run with samples trains exactly like one without. One failing sample
(a pipeline error, out of memory, a full disk) is logged and skipped; the run goes on.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.models.base import SampleRequest

logger = logging.getLogger(__name__)

SAMPLES_DIR_NAME = "samples"
_SLUG_MAX = 48  # characters of the prompt kept in a file name (paths stay far below Windows' 260)


def should_sample(step: int, config: dict[str, Any]) -> bool:
    """Whether step `step` is a sampling step: sampling on (every_n_steps > 0), prompts given, step a multiple."""
    sampling = config["sampling"]
    every = int(sampling.get("every_n_steps", 0))
    return every > 0 and bool(sampling.get("prompts")) and step > 0 and step % every == 0


def _slug(prompt: str) -> str:
    # ASCII letters, digits and single hyphens only: safe on every filesystem (no Windows-reserved
    # characters or names, no trailing dots or spaces), and readable in a file browser.
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii").lower()
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    text = text[:_SLUG_MAX].rstrip("-")
    return text or "prompt"  # e.g. a prompt in a non-Latin script; the index still tells them apart


def sample_file_name(step: int, index: int, prompt: str, suffix: str = ".mp4") -> str:
    """The file name of prompt number `index` sampled at `step`, e.g. 'step-000250-0-a-cat-walking.mp4'
    ('.png' for an image model's samples).

    Names sort by step; the index keeps prompts with the same slug apart."""
    return f"step-{step:06d}-{index}-{_slug(prompt)}{suffix}"


def asked_file_name(folder: Path, step: int, prompt: str, suffix: str = ".mp4") -> str:
    """The file name of a sample asked with its own parameters at `step`: 'step-000250-w1-a-cat.mp4',
    with the first number n that names no file in `folder` yet (each asked sample is kept)."""
    n = 1
    while True:
        name = f"step-{step:06d}-w{n}-{_slug(prompt)}{suffix}"
        if not (folder / name).exists():
            return name
        n += 1


def makes_stills(adapter: Any) -> bool:
    """Whether the model makes still images only (its frame rule takes one frame): its samples are PNGs."""
    return bool(getattr(adapter.frame_rule, "stills_only", False))


@contextmanager
def _training_state_kept(modules: list[Any]) -> Iterator[None]:
    """Put back the train/eval flag of every submodule, every requires_grad flag and the global RNG
    states on exit, and run the body without gradients."""
    import torch

    from .resume import restore_rng_states, rng_states

    flags = [(m, m.training) for module in modules for m in module.modules()]
    grads = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    # The pipeline seeds its own generator, but anything inside that draws from the global ones
    # (torch, CUDA, numpy, Python) must not shift training's noise: the same states a backup keeps.
    states = rng_states()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training  # per submodule: train(flag) would overwrite mixed flags
        for param, requires_grad in grads:
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)
        restore_rng_states(states)


def _text_encoders(adapter: Any) -> dict[str, Any]:
    """The adapter's text encoders by name, None where not loaded ({} for an adapter without any)."""
    text_parts = getattr(adapter, "text_parts", None)
    return {name: encoder for name, (_, encoder) in text_parts().items()} if text_parts is not None else {}


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def _first_frame(image: Any) -> Any:
    """The conditioning first frame as a uint8 (H, W, 3) numpy array (or a PIL image as it is)."""
    if image is None or hasattr(image, "convert"):  # PIL.Image
        return image
    import numpy as np  # here, not at the top: the window lists samples (SAMPLES_DIR_NAME) before numpy loads

    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"the first frame for samples must be (H, W, 3), got {tuple(array.shape)}")
    return array.astype(np.uint8, copy=False)


class SampleMaker:
    """Makes the sample videos of a run. Construct once per run; call make() at each sampling step.

    adapter: the run's ModelAdapter; config: the resolved run config (sections "sampling" and
    "video_config" are read at each make(), so live edits of prompts apply); workspace: the run's
    workspace_dir; device/dtype: where and in what dtype the pipeline runs (the training device and
    compute dtype). image: the first frame for an image-conditioned model (uint8 (H, W, 3)); it may be
    set later through the `image` attribute. on_sample(path) is called for each file written, and
    on_sampling(step, done, count) before each sample and once all are made (done == count).
    unload_encoders_after: drop the adapter's VAE and text encoder after sampling (they are loaded for
    it); pass False when training needs them loaded (e.g. it trains the text encoder).
    """

    def __init__(
        self,
        adapter: Any,
        config: dict[str, Any],
        workspace: str | Path,
        device: Any,
        dtype: Any,
        image: Any = None,
        on_sample: Callable[[Path], None] | None = None,
        *,
        unload_encoders_after: bool = True,
        on_sampling: Callable[[int, int, int], None] | None = None,
    ) -> None:
        self.adapter = adapter
        self.config = config
        self.folder = Path(workspace).expanduser() / SAMPLES_DIR_NAME
        self.device, self.dtype = device, dtype
        self.image = image
        self.on_sample = on_sample
        self.unload_encoders_after = unload_encoders_after
        self.on_sampling = on_sampling  # (step, samples done, samples in all): before each and after the last
        self.failures: list[str] = []  # why samples of the last make() were not made, one line each

    def make(self, step: int, denoisers: dict[str, Any], asked: list[SampleRequest] | None = None) -> list[Path]:
        """One video per configured prompt from `denoisers` (component name -> the unwrapped module
        as it trains now, e.g. {"transformer": ...}); returns the files written (failed prompts have none).
        asked: samples asked with their own parameters (the window's sample window) made instead of
        the configured prompts; their files are named '<step>-w<n>-<prompt>' (see asked_file_name)."""
        self.failures = []
        requests = self._configured() if asked is None else list(asked)
        if not requests:
            return []
        try:
            image = _first_frame(self.image)
        except ValueError as exc:
            self._skip(step, str(exc))
            return []
        requests = [r if r.image is not None else replace(r, image=image) for r in requests]
        if getattr(self.adapter, "image_conditioned", False) and any(r.image is None for r in requests):
            self._skip(step, "this image-to-video model needs a first frame and none was given")
            return []
        fps = float(self.config["video_config"]["target_fps"])
        # Text encoders that training holds (fine-tuned, or carrying textual-inversion tokens) are
        # sampled as they are and their flags are restored like the denoisers'.
        encoders = _text_encoders(self.adapter)
        held = [e for e in encoders.values() if e is not None] if not self.unload_encoders_after else []
        missing = [name for name, encoder in encoders.items() if encoder is None]
        if missing:
            # Loaded here each in its own section's weight_dtype (a quantized storage stays quantized);
            # the family's sampler uses an encoder that is already loaded as it is.
            from core.models.conditions import load_text_encoders, text_weight_dtypes

            load_text_encoders(self.adapter, self.device, text_weight_dtypes(self.adapter, self.config), missing)
        written: list[Path] = []
        try:
            with _training_state_kept([*denoisers.values(), *held]):
                for encoder in held:
                    encoder.eval()  # no dropout in the samples; the flags come back after
                for index, request in enumerate(requests):
                    self._tell(step, index, len(requests))
                    name = self._file_name(step, index, request, asked is not None)
                    path = self._one(step, index, len(requests), name, request, denoisers, fps)
                    if path is not None:
                        written.append(path)
        finally:
            self._tell(step, len(requests), len(requests))
            if self.unload_encoders_after:
                self.adapter.unload_encoders()
        return written

    def _configured(self) -> list[SampleRequest]:
        """The sampling settings' prompts, each with the settings' size, frames, steps and seed."""
        sampling = self.config["sampling"]
        return [SampleRequest(str(prompt), width=int(sampling["width"]), height=int(sampling["height"]),
                              frames=int(sampling["frames"]), steps=int(sampling["inference_steps"]),
                              guidance_scale=float(sampling["guidance_scale"]), seed=int(sampling["seed"]))
                for prompt in sampling.get("prompts") or []]

    def _skip(self, step: int, reason: str) -> None:
        self.failures.append(reason)
        logger.warning("no samples at step %d: %s", step, reason)

    def _file_name(self, step: int, index: int, request: SampleRequest, asked: bool) -> str:
        suffix = ".png" if makes_stills(self.adapter) else ".mp4"
        if not asked:
            return sample_file_name(step, index, request.prompt, suffix)
        return asked_file_name(self.folder, step, request.prompt, suffix)

    def _tell(self, step: int, done: int, count: int) -> None:
        if self.on_sampling is not None:
            try:
                self.on_sampling(step, done, count)
            except Exception:  # a client's problem is not the run's
                logger.warning("the sampling progress report failed", exc_info=True)

    def _one(self, step: int, index: int, count: int, name: str, request: SampleRequest,
             denoisers: dict[str, Any], fps: float) -> Path | None:
        from core.atomic import explained_write_errors
        from core.export.video_file import write_mp4

        started = time.perf_counter()
        failure, out_of_memory = None, False
        prompt = request.prompt
        try:
            video = self.adapter.sample(denoisers, request, device=self.device, dtype=self.dtype)
            target = self.folder / name
            if makes_stills(self.adapter):
                from core.export.image_file import write_png

                with explained_write_errors(target, "the sample image", key="workspace_dir"):
                    path = write_png(target, video)
            else:
                with explained_write_errors(target, "the sample video", key="workspace_dir"):
                    path = write_mp4(target, video, fps)
        except Exception as exc:  # one bad sample must not end a training run
            failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            out_of_memory = _is_out_of_memory(exc)
            logger.debug("sample failure details", exc_info=True)
        if failure is not None:
            if out_of_memory:
                # Outside the except block: the traceback no longer holds the failed sample's tensors.
                _free_cuda_cache()
                failure = (f"out of memory ({failure}); lower sampling width/height/frames, or free memory "
                           "with quantization or layer offloading")
            logger.warning("sample %d/%d at step %d failed for prompt %r: %s", index + 1, count, step, prompt, failure)
            self.failures.append(failure)
            return None
        logger.info("sample %d/%d at step %d (%d frames, %dx%d, %.1f s): %s", index + 1, count, step,
                    video.shape[0], video.shape[2], video.shape[1], time.perf_counter() - started, path)
        if self.on_sample is not None:
            try:
                self.on_sample(path)
            except Exception:  # a viewer's problem is not the run's
                logger.warning("the sample viewer failed on %s", path, exc_info=True)
        return path


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give back what the failed sample held before training goes on
