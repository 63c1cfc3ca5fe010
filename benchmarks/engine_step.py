"""Does the engine's training step cost more than a hand-written diffusers + peft loop doing the same work?

Both train a LoRA on the tiny Wan 2.1 model (built into a temporary folder), in one process, taking
turns step by step: the engine runs (core.train.trainer.Trainer.run on a warm cache) and, each time
it asks its data loader for the next batch, the loader first runs one step of the hand-written loop
on that batch, timed on its own. The engine's time for a step is its own seconds_per_step less the
hand step that ran inside it, so every engine step is measured next to a hand step made a moment
before, under the same load: this machine is shared, and separate rounds of each drifted by +-40 %.
Each round is one engine run of --warmup + --steps steps with a new hand-loop model; only the last
--steps steps of each count.

The work is the same on both sides: FLOAT_32, LoRA rank 8 / alpha 8 on the model family's default
targets (transformer.add_adapter with peft's LoraConfig, weights cast to float32), batches of 2
cached samples of one clip (latents (16, 3, 8, 8), text (512, 32)), the SHIFTED noise-level draw
(sigmoid of N(0, 1), flow-shifted by 3), x_t = (1 - sigma) x + sigma noise, the velocity target
noise - x, plain MSE (temporal_consistency_weight 0, loss_weighting NONE), backward, clipping to a
total norm of 1.0, AdamW (weight decay 0.01), and reading the loss back as a number.

What counts as the engine's step: everything Trainer._loop does per step, with the data loader
replaced by the batches the real loader gives, read into memory before the loop starts
(make_loader is patched). So it includes per-sample seeded noise, accelerate's accumulate /
autocast / backward / clip_grad_norm_, the non-finite check (which gathers the loss), the scheduler,
the step record with its memory snapshot, the metrics.jsonl and TensorBoard writes and the callbacks;
it leaves out reading batches from the cache, which benchmarks/cache_load.py measures (about 1.4 ms
per batch here) and which the hand loop has no counterpart of.

With --what-if, each round also runs the engine once more with TensorBoard off (patched from outside
in this process only; core/ is unchanged), to show what TensorBoard's events cost.

--parts times the pieces of each side's step separately (each function the engine's loop calls is
wrapped with a timer; the hand loop times its own lines), to say where a difference comes from.
--aa checks the method: two copies of the hand loop interleaved step by step should come out equal.

    python benchmarks/engine_step.py [--rounds 5] [--steps 30] [--warmup 5] [--threads 1] [--what-if] [--parts] [--aa] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # media_factory, for the clip

import torch  # noqa: E402

import core.train.trainer as trainer_module  # noqa: E402
from core.config import load_preset, resolve  # noqa: E402
from core.models.tiny import build_tiny_model  # noqa: E402
from core.models.wan import WanAdapter  # noqa: E402
from core.train.events import TrainerCallbacks  # noqa: E402

LR = 1e-4
SHIFT = 3.0
RANK = ALPHA = 8
BATCH = 2
SEED = 42


def engine_config(work: Path, model: Path, clip: Path, steps: int, name: str) -> dict[str, Any]:
    return resolve(
        load_preset("#demo tiny wan LoRA"),
        {
            "base_model": str(model),
            "datasets": [{"path": str(clip), "repeats": BATCH}],  # one batch of 2 per pass
            "workspace_dir": str(work / name / "workspace"),
            "cache_dir": str(work / "cache"),
            "output_path": str(work / name / "lora.safetensors"),
            "train_dtype": "FLOAT_32",
            "transformer": {"weight_dtype": "FLOAT_32"},
            "gradient_checkpointing": "OFF",
            "batch_size": BATCH,
            "video_config": {"video_batch_size_multiplier": 1.0, "temporal_consistency_weight": 0.0, "max_frames": 9},
            "objective": {"timestep_distribution": "SHIFTED", "timestep_shift": SHIFT, "sigmoid_scale": 1.0,
                          "min_timestep": 0.0, "max_timestep": 1.0, "loss_weighting": "NONE"},
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


class HandLoop:
    """The same training, written out with diffusers and peft."""

    def __init__(self, model_dir: Path, parts: dict[str, list[float]] | None = None) -> None:
        from diffusers import WanTransformer3DModel
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        transformer = WanTransformer3DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=torch.float32)
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights=True,
                                           target_modules=WanAdapter(model_dir).default_lora_targets()))
        cast_training_params(transformer, dtype=torch.float32)
        self.transformer = transformer.train()
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=1e-2)
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.parts = parts

    def _mark(self, name: str, since: float) -> float:
        now = time.perf_counter()
        if self.parts is not None:
            self.parts.setdefault(name, []).append(now - since)
        return now

    def step(self, batch: dict[str, Any], step: int) -> float:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        started, started_cpu = time.perf_counter(), time.process_time()
        latents, embeds = batch["latents"], batch["prompt_embeds"]
        generator = torch.Generator().manual_seed(SEED * 1_000_003 + step)
        u = compute_density_for_timestep_sampling("logit_normal", latents.shape[0], logit_mean=0.0, logit_std=1.0,
                                                  generator=generator)
        sigmas = SHIFT * u / (1 + (SHIFT - 1) * u)
        noise = torch.randn(latents.shape, generator=generator)
        t = self._mark("noise and noise levels", started)
        s = sigmas.view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        prediction = self.transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=embeds,
                                      return_dict=False)[0]
        t = self._mark("noisy input and forward", t)
        loss = torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())
        t = self._mark("loss", t)
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


class InterleavedLoader:
    """make_loader's replacement: the real loader's batches, all read before training starts; before
    handing over each batch after the first, one hand-loop step runs on it."""

    def __init__(self, hand: HandLoop | None) -> None:
        self.real = trainer_module.make_loader
        self.hand = hand
        self.batches: list[dict[str, Any]] = []
        self.summary_writers: list[Any] = []  # the engine's TensorBoard writers (see __iter__)

    def __call__(self, *args: Any, **kwargs: Any) -> InterleavedLoader:
        real = self.real(*args, **kwargs)
        self.batches = list(real)
        real.close()  # its workers are done: every batch is in memory
        return self

    def close(self) -> None:
        """What the trainer calls when its steps end (the real loader ends its workers there)."""

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        for i, batch in enumerate(self.batches):
            if i and self.hand is not None:
                # TensorBoard writes its events in a background thread; left alone, that work would
                # land in the hand step's time. Waiting for it here counts it as the engine's.
                for writer in self.summary_writers:
                    writer.flush()
                self.hand.step(batch, i)
            yield batch


class StepTimes(TrainerCallbacks):
    """Each step's wall seconds (the engine's own seconds_per_step) and the process's CPU seconds
    between consecutive on_metrics calls (one per step)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._last_cpu = math.nan

    def on_metrics(self, record: dict[str, Any]) -> None:
        now = time.process_time()
        self.wall.append(record["seconds_per_step"])
        self.cpu.append(now - self._last_cpu)
        self._last_cpu = now


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def engine_round(work: Path, model: Path, clip: Path, steps: int, name: str, hand: HandLoop | None,
                 what_if: tuple[str, ...] = ()) -> dict[str, list[float]]:
    """One Trainer run with the hand loop interleaved: per-step times of both, warm-up included.

    Engine step k (k >= 1) contains hand step k - 1 (run while the engine waited for batch k), which
    is subtracted; engine step 0 has none.
    """

    from core.train import telemetry

    loader, times = InterleavedLoader(hand), StepTimes()
    real_tensorboard = telemetry._open_summary_writer
    trainer_module.make_loader = loader
    if "tensorboard" in what_if:
        telemetry._open_summary_writer = lambda *args: None
    else:
        def open_and_keep(*args: Any) -> Any:
            writer = real_tensorboard(*args)
            if writer is not None:
                loader.summary_writers.append(writer)
            return writer

        telemetry._open_summary_writer = open_and_keep
    try:
        reset_accelerate()
        result = trainer_module.Trainer(engine_config(work, model, clip, steps, name), times).run()
    finally:
        trainer_module.make_loader = loader.real
        telemetry._open_summary_writer = real_tensorboard
    assert result.steps == steps and result.skipped_steps == 0, result
    if hand is None:
        return {"engine wall": times.wall, "engine cpu": times.cpu}
    assert len(hand.wall) == steps - 1
    return {
        "engine wall": [times.wall[0]] + [e - h for e, h in zip(times.wall[1:], hand.wall)],
        "engine cpu": [times.cpu[0]] + [e - h for e, h in zip(times.cpu[1:], hand.cpu)],
        "hand wall": [math.nan] + hand.wall,
        "hand cpu": [math.nan] + hand.cpu,
    }


def report(title: str, rounds: dict[str, list[dict[str, list[float]]]], kind: str, warmup: int) -> None:
    """Per side: each round's median engine step, the median of all its engine and hand steps, their
    ratio, and the median of the per-step ratios (each engine step over the hand step beside it)."""
    med = statistics.median
    print(f"\n{title} (ms)")
    count = len(next(iter(rounds.values())))
    print(f"{'engine':40}" + "".join(f"  {'round ' + str(r):>8}" for r in range(count))
          + f"  {'engine':>8}  {'hand':>8}  {'ratio':>7}  {'per step':>8}")
    for name, side in rounds.items():
        engine = [x for rnd in side for x in rnd[f"engine {kind}"][warmup:]]
        hand = [x for rnd in side for x in rnd[f"hand {kind}"][warmup:]]
        per_step = [e / h for e, h in zip(engine, hand)]
        print(f"{name:40}" + "".join(f"  {med(rnd[f'engine {kind}'][warmup:]) * 1e3:8.2f}" for rnd in side)
              + f"  {med(engine) * 1e3:8.2f}  {med(hand) * 1e3:8.2f}  {med(engine) / med(hand):7.3f}  {med(per_step):8.3f}")


def engine_parts(work: Path, model: Path, clip: Path, steps: int, warmup: int) -> None:
    """Mean ms per step of each function the engine's loop calls, timed by wrapping it, and of the
    hand loop's lines (means, so that the parts add up to the step)."""
    import functools

    import accelerate
    from accelerate.optimizer import AcceleratedOptimizer
    from torch.optim.lr_scheduler import LRScheduler

    import core.train.loop as loop_module
    from core.models.objectives import FlowMatching
    from core.train import telemetry

    parts: dict[str, list[float]] = {}
    targets = [
        # The loop's own names (core/train/loop.py), and the objective's methods it calls.
        (loop_module, "sample_noise", "noise and noise levels (sample_noise)"),
        (FlowMatching, "noisy", "noisy input (objective.noisy)"),
        (WanAdapter, "predict", "forward (adapter.predict)"),
        (FlowMatching, "target", "target (objective.target)"),
        (loop_module, "training_loss", "loss (training_loss)"),
        (accelerate.Accelerator, "gather", "accelerator.gather (2 calls)"),
        (accelerate.Accelerator, "backward", "backward (accelerator.backward)"),
        (accelerate.Accelerator, "clip_grad_norm_", "accelerator.clip_grad_norm_"),
        (AcceleratedOptimizer, "step", "optimizer step"),
        (LRScheduler, "step", "scheduler step"),
        (AcceleratedOptimizer, "zero_grad", "zero_grad"),
        (telemetry, "step_record", "step_record (with memory snapshot)"),
        (telemetry.MetricsWriter, "write", "MetricsWriter.write (jsonl + TensorBoard)"),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]

    def timed(real: Any, label: str) -> Any:
        @functools.wraps(real)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                parts.setdefault(label, []).append(time.perf_counter() - started)

        return wrapper

    for owner, name, label in targets:
        setattr(owner, name, timed(getattr(owner, name), label))
    hand_parts: dict[str, list[float]] = {}
    hand = HandLoop(model, hand_parts)
    try:
        times = engine_round(work, model, clip, steps, "parts", hand)  # interleaved, as above
    finally:
        for owner, name, real in originals:
            setattr(owner, name, real)
    for title, table, step_times in (("engine", parts, times["engine wall"]), ("hand-written loop", hand_parts, times["hand wall"])):
        total = statistics.fmean(step_times[warmup:])
        print(f"\nparts of the {title}'s step, mean ms per step over {steps - warmup} steps")
        counted = 0.0
        for label, values in table.items():
            per_step = len(values) / steps
            value = statistics.fmean(values[round(warmup * per_step):]) * per_step
            counted += value
            print(f"  {label:45} {value * 1e3:7.2f}")
        print(f"  {'everything else':45} {(total - counted) * 1e3:7.2f}")
        print(f"  {'step':45} {total * 1e3:7.2f}")


def same_step_twice(model: Path, steps: int, warmup: int) -> None:
    """The method's check: two hand loops interleaved step by step, as the engine and one are."""
    batch = {"latents": torch.randn(BATCH, 16, 3, 8, 8), "prompt_embeds": torch.randn(BATCH, 512, 32)}
    ratios = []
    for _ in range(3):
        first, second = HandLoop(model), HandLoop(model)
        for i in range(steps):
            first.step(batch, i)
            second.step(batch, i)
        ratios.append(statistics.median([b / a for a, b in zip(first.wall[warmup:], second.wall[warmup:])]))
    print(f"\nsame hand step twice, interleaved: second / first per step, median of 3 rounds: "
          f"{', '.join(f'{r:.3f}' for r in ratios)}")


def profile(label: str, call: Any, lines: int = 25) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    call()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats(os.environ.get("PROFILE_SORT", "tottime")).print_stats(os.environ.get("PROFILE_FILTER", ""), lines)
    print(f"\n--- cProfile, {label} (sorted by own time) ---")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--what-if", action="store_true", help="also time the engine with two of its costs removed")
    parser.add_argument("--parts", action="store_true", help="also time the pieces of each side's step")
    parser.add_argument("--aa", action="store_true", help="also interleave two hand loops (checks the method)")
    parser.add_argument("--profile", action="store_true", help="also profile one engine run with cProfile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from media_factory import make_clip

    with tempfile.TemporaryDirectory(prefix="vt-engine-bench-") as tmp:
        work = Path(tmp)
        model = build_tiny_model("wan21", work / "wan21")
        clip = work / "clip"
        clip.mkdir()
        make_clip(clip / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
        (clip / "clip.txt").write_text("a square moving across the frame", encoding="utf-8")

        steps = args.warmup + args.steps
        # Fill the cache and load every library once, outside the measurement.
        engine_round(work, model, clip, steps, "prime", HandLoop(model))

        sides: dict[str, tuple[str, ...]] = {"engine": ()}
        if args.what_if:
            sides.update({"engine, no TensorBoard": ("tensorboard",)})
        names = list(sides)
        rounds: dict[str, list[dict[str, list[float]]]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:  # each side goes first in turn
                rounds[name].append(engine_round(work, model, clip, steps, f"round{r}", HandLoop(model), sides[name]))

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; batches of {BATCH}: latents (16, 3, 8, 8), text (512, 32); "
              f"{args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up)")
        report("wall time per step", rounds, "wall", args.warmup)
        report("CPU time of the process per step", rounds, "cpu", args.warmup)
        print("\ntarget: engine / hand <= 1.10")

        if args.parts:
            engine_parts(work, model, clip, args.warmup + 60, args.warmup)
        if args.aa:
            same_step_twice(model, steps, args.warmup)
        if args.profile:
            profile("engine run without the hand loop", lambda: engine_round(work, model, clip, steps, "profile", None))


if __name__ == "__main__":
    main()
