"""Does the engine's training step cost more than a hand-written diffusers + peft loop doing the same work?

Per model family (--family; by default each in turn, each with its own report: the tiny Wan 2.1 and
the tiny CogVideoX, built into a temporary folder), both sides train a LoRA in one process, taking
turns step by step: the engine runs (core.train.trainer.Trainer.run on a warm cache) and, each time
it asks its data loader for the next batch, the loader first runs one step of the hand-written loop
on that batch, timed on its own. The engine's time for a step is its own seconds_per_step less the
hand step that ran inside it, so every engine step is measured next to a hand step made a moment
before, under the same load: this machine is shared, and separate rounds of each drifted by +-40 %.
Each round is one engine run of --warmup + --steps steps with a new hand-loop model; only the last
--steps steps of each count.

The work is the same on both sides: benchmarks/hand_loops.py writes each family's hand loop and the
engine settings that match it (FLOAT_32, LoRA rank 8 / alpha 8 on the family's default targets,
batches of 2 cached samples of one 64 px, 9-frame clip, the family's noise-level draw, noisy input
and loss, clipping at 1.0, AdamW). Before timing, a check runs the engine's first step and the hand
loop's on the same batch with the engine's noise and noise levels: their losses must agree to
float32 precision, or the script stops.

What counts as the engine's step: everything Trainer._loop does per step, with the data loader
replaced by the batches the real loader gives, read into memory before the loop starts
(make_loader is patched). So it includes per-sample seeded noise, accelerate's accumulate /
autocast / backward / clip_grad_norm_, the non-finite check (which gathers the loss), the scheduler,
the step record with its memory snapshot, the metrics.jsonl and TensorBoard writes and the callbacks;
it leaves out reading batches from the cache, which benchmarks/cache_load.py measures (about 1.4 ms
per batch here) and which the hand loop has no counterpart of.

With --what-if, each round also runs the engine once more with TensorBoard off (patched from
outside in this process only, core/ unchanged), to show what TensorBoard's events cost.

--parts times the pieces of each side's step separately (each function the engine's loop calls is
wrapped with a timer; the hand loop times its own lines), to say where a difference comes from.
--aa checks the method: two copies of the hand loop interleaved step by step should come out equal.

    python benchmarks/engine_step.py [--family wan21|cogvideox ...] [--rounds 5] [--steps 30] [--warmup 5] [--threads 1] [--what-if] [--parts] [--aa] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
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
sys.path.insert(0, str(ROOT / "benchmarks"))  # hand_loops

import torch  # noqa: E402
from hand_loops import BATCH, CASES, HandLoop, engine_config  # noqa: E402

import core.train.loop as loop_module  # noqa: E402
import core.train.trainer as trainer_module  # noqa: E402
from core.models.tiny import build_tiny_model  # noqa: E402
from core.train.events import TrainerCallbacks  # noqa: E402

Case = type[HandLoop]
# The relative difference the equality check allows: the two sides reduce the squared errors in
# another order (per sample, then the batch; or all at once), a few float32 roundings apart.
LOSS_RTOL = 1e-6


def wait_for_events(writer: Any) -> None:
    """Until TensorBoard's writer thread has written every queued event into its file: the work a
    run does per step. Not SummaryWriter.flush(), which also flushes the file to disk, a system call
    a run makes once per flush_secs (10 s), not per step (0.1-0.3 ms here, a few % of a tiny step)."""
    try:
        queue = writer.file_writer.event_writer._async_writer._byte_queue  # tensorboard 2.x internals
    except AttributeError:
        writer.flush()  # another layout: the conservative wait
        return
    queue.join()


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
                    wait_for_events(writer)
                self.hand.step(batch, i)
            yield batch


class StepTimes(TrainerCallbacks):
    """Each step's wall seconds (the engine's own seconds_per_step), the process's CPU seconds
    between consecutive on_metrics calls (one per step) and the step's loss."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.loss: list[float] = []
        self._last_cpu = math.nan

    def on_metrics(self, record: dict[str, Any]) -> None:
        now = time.process_time()
        self.wall.append(record["seconds_per_step"])
        self.loss.append(record["loss"])
        self.cpu.append(now - self._last_cpu)
        self._last_cpu = now


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_engine(case: Case, work: Path, model: Path, clip: Path, steps: int, name: str, loader: InterleavedLoader,
               times: StepTimes, what_if: tuple[str, ...] = ()) -> None:
    """One Trainer run of `steps` steps with `loader` as its data loader and `times` as its callbacks."""
    from core.train import telemetry

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
        result = trainer_module.Trainer(engine_config(case, work, model, clip, steps, name), times).run()
    finally:
        trainer_module.make_loader = loader.real
        telemetry._open_summary_writer = real_tensorboard
    assert result.steps == steps and result.skipped_steps == 0, result


def engine_round(case: Case, work: Path, model: Path, clip: Path, steps: int, name: str, hand: HandLoop | None,
                 what_if: tuple[str, ...] = ()) -> dict[str, list[float]]:
    """One Trainer run with the hand loop interleaved: per-step times of both, warm-up included.

    Engine step k (k >= 1) contains hand step k - 1 (run while the engine waited for batch k), which
    is subtracted; engine step 0 has none.
    """
    times = StepTimes()
    run_engine(case, work, model, clip, steps, name, InterleavedLoader(hand), times, what_if)
    if hand is None:
        return {"engine wall": times.wall, "engine cpu": times.cpu}
    assert len(hand.wall) == steps - 1
    return {
        "engine wall": [times.wall[0]] + [e - h for e, h in zip(times.wall[1:], hand.wall)],
        "engine cpu": [times.cpu[0]] + [e - h for e, h in zip(times.cpu[1:], hand.cpu)],
        "hand wall": [math.nan] + hand.wall,
        "hand cpu": [math.nan] + hand.cpu,
    }


def same_first_loss(case: Case, work: Path, model: Path, clip: Path) -> dict[str, Any]:
    """The check that both sides do the same work: the engine's first step and a new hand loop's, on
    the same batch with the noise and noise levels the engine drew, give the same loss, and both
    train as many LoRA parameters (the LoRA's up-projection starts at zero, so the first loss is the
    base model's on both sides whatever the LoRA; its size says it sits on the same layers). Stops
    the script if they differ; returns the batch."""
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_sample_noise = loop_module.sample_noise

    def keep(*args: Any, **kwargs: Any) -> Any:
        sigmas, noise = real_sample_noise(*args, **kwargs)
        drawn.append((sigmas.clone(), noise.clone()))
        return sigmas, noise

    loader, times = InterleavedLoader(None), StepTimes()
    loop_module.sample_noise = keep
    try:
        run_engine(case, work, model, clip, 1, "check", loader, times)
    finally:
        loop_module.sample_noise = real_sample_noise
    sigmas, noise = drawn[0]
    objective = case.adapter_class(model).objective(case.engine_objective)
    hand_loop = case(model)
    hand = hand_loop.step(loader.batches[0], 0, (noise, case.levels(objective, sigmas)))
    engine = times.loss[0]
    difference = abs(engine - hand) / abs(hand)
    info = json.loads((work / "check" / "workspace" / "run_info.json").read_text(encoding="utf-8"))
    trained = (info["parts"]["transformer"]["trainable_parameters"], sum(p.numel() for p in hand_loop.params))
    print(f"{case.family}: first step on the same batch and draws: engine loss {engine:.9g}, hand loss {hand:.9g}, "
          f"relative difference {difference:.2e} (allowed {LOSS_RTOL:.0e}); LoRA parameters {trained[0]} and "
          f"{trained[1]}", flush=True)
    if not difference <= LOSS_RTOL or trained[0] != trained[1]:
        raise SystemExit(f"{case.family}: the engine and the hand loop do not compute the same loss; timing them "
                         "would compare different work")
    return loader.batches[0]


def report(title: str, rounds: dict[str, list[dict[str, list[float]]]], kind: str, warmup: int) -> None:
    """Per side: each round's median engine step, the median of all its engine and hand steps, their
    ratio, the median of the per-step ratios (each engine step over the hand step beside it), and the
    ratio of the means: work the engine does once in many steps (handing a second's TensorBoard
    events to its writer thread) lands in few steps, which the medians pass over and the means count."""
    med, mean = statistics.median, statistics.fmean
    print(f"\n{title} (ms)")
    count = len(next(iter(rounds.values())))
    print(f"{'engine':40}" + "".join(f"  {'round ' + str(r):>8}" for r in range(count))
          + f"  {'engine':>8}  {'hand':>8}  {'ratio':>7}  {'per step':>8}  {'of means':>8}")
    for name, side in rounds.items():
        engine = [x for rnd in side for x in rnd[f"engine {kind}"][warmup:]]
        hand = [x for rnd in side for x in rnd[f"hand {kind}"][warmup:]]
        per_step = [e / h for e, h in zip(engine, hand)]
        print(f"{name:40}" + "".join(f"  {med(rnd[f'engine {kind}'][warmup:]) * 1e3:8.2f}" for rnd in side)
              + f"  {med(engine) * 1e3:8.2f}  {med(hand) * 1e3:8.2f}  {med(engine) / med(hand):7.3f}  {med(per_step):8.3f}"
              f"  {mean(engine) / mean(hand):8.3f}")


def engine_parts(case: Case, work: Path, model: Path, clip: Path, steps: int, warmup: int) -> None:
    """ms per step of each function the engine's loop calls, timed by wrapping it, and of the hand
    loop's lines: means (so that the parts add up to the step) and medians."""
    import functools

    import accelerate
    from accelerate.optimizer import AcceleratedOptimizer
    from torch.optim.lr_scheduler import LRScheduler

    from core.train import telemetry

    parts: dict[str, list[float]] = {}
    targets = [
        # The loop's own names (core/train/loop.py), and the adapter's and objective's methods it calls.
        (loop_module, "sample_noise", "noise and noise levels (sample_noise)"),
        (case.objective_class, "noisy", "noisy input (objective.noisy)"),
        (case.adapter_class, "predict", "forward (adapter.predict)"),
        (case.objective_class, "target", "target (objective.target)"),
        (loop_module, "training_loss", "loss (training_loss)"),
        (accelerate.Accelerator, "gather", "accelerator.gather (2 calls)"),
        (accelerate.Accelerator, "backward", "backward (accelerator.backward)"),
        (accelerate.Accelerator, "clip_grad_norm_", "accelerator.clip_grad_norm_"),
        (AcceleratedOptimizer, "step", "optimizer step"),
        (LRScheduler, "step", "scheduler step"),
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
    # The loop zeroes the gradients through a function zero_grad_of makes once per run: time what it returns.
    make_zero_grad = loop_module.zero_grad_of
    loop_module.zero_grad_of = lambda *args: timed(make_zero_grad(*args), "zero_grad (zero_grad_of)")
    originals.append((loop_module, "zero_grad_of", make_zero_grad))
    hand_parts: dict[str, list[float]] = {}
    hand = case(model, hand_parts)
    try:
        times = engine_round(case, work, model, clip, steps, "parts", hand)  # interleaved, as above
    finally:
        for owner, name, real in originals:
            setattr(owner, name, real)
    for title, table, step_times in (("engine", parts, times["engine wall"]), ("hand-written loop", hand_parts, times["hand wall"])):
        total = statistics.fmean(step_times[warmup:])
        # Means add up to the step; medians leave out the odd slow call (a garbage collection,
        # another job taking the core), which a mean spreads over all 60 steps.
        print(f"\n{case.family}: parts of the {title}'s step, ms per step over {steps - warmup} steps\n"
              f"  {'':60} {'mean':>8} {'median':>8}")
        counted = 0.0
        for label, values in table.items():
            per_step = len(values) / steps
            kept = values[round(warmup * per_step):]
            value = statistics.fmean(kept) * per_step
            counted += value
            print(f"  {label:60} {value * 1e3:8.2f} {statistics.median(kept) * per_step * 1e3:8.2f}")
        print(f"  {'everything else':60} {(total - counted) * 1e3:8.2f}")
        print(f"  {'step':60} {total * 1e3:8.2f} {statistics.median(step_times[warmup:]) * 1e3:8.2f}")


def same_step_twice(case: Case, model: Path, batch: dict[str, Any], steps: int, warmup: int) -> None:
    """The method's check: two hand loops interleaved step by step, as the engine and one are."""
    ratios = []
    for _ in range(3):
        first, second = case(model), case(model)
        for i in range(steps):
            first.step(batch, i)
            second.step(batch, i)
        ratios.append(statistics.median([b / a for a, b in zip(first.wall[warmup:], second.wall[warmup:])]))
    print(f"\n{case.family}: same hand step twice, interleaved: second / first per step, median of 3 rounds: "
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


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench_family(case: Case, work: Path, args: argparse.Namespace) -> None:
    """Everything the command line asks for one family, in a folder of its own: the tiny model, the
    clip, the cache, the runs."""
    from media_factory import make_clip

    model = build_tiny_model(case.family, work / case.family)
    clip = work / "clip"
    clip.mkdir()
    make_clip(clip / "clip.mp4", width=64, height=64, fps=16, seconds=1.0)
    (clip / "clip.txt").write_text("a square moving across the frame", encoding="utf-8")

    steps = args.warmup + args.steps
    # Fill the cache and load every library once, outside the measurement.
    engine_round(case, work, model, clip, steps, "prime", case(model))
    batch = same_first_loss(case, work, model, clip)

    sides: dict[str, tuple[str, ...]] = {"engine": ()}
    if args.what_if:
        sides.update({"engine, no TensorBoard": ("tensorboard",)})
    names = list(sides)
    rounds: dict[str, list[dict[str, list[float]]]] = {name: [] for name in names}
    load_before = load_average()
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # each side goes first in turn
            rounds[name].append(engine_round(case, work, model, clip, steps, f"round{r}", case(model), sides[name]))

    shapes = ", ".join(f"{key} {tuple(batch[key].shape[1:])}" for key in ("latents", "prompt_embeds"))
    print(f"\n== {case.family} ==\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load_before} before the rounds, {load_average()} after; batches of {BATCH}: {shapes}; "
          f"{args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up)")
    report(f"{case.family}: wall time per step", rounds, "wall", args.warmup)
    report(f"{case.family}: CPU time of the process per step", rounds, "cpu", args.warmup)
    print("\ntarget: engine / hand <= 1.10", flush=True)

    if args.parts:
        engine_parts(case, work, model, clip, args.warmup + 60, args.warmup)
    if args.aa:
        same_step_twice(case, model, batch, steps, args.warmup)
    if args.profile:
        profile(f"{case.family}: engine run without the hand loop",
                lambda: engine_round(case, work, model, clip, steps, "profile", None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=list(CASES), action="append",
                        help="the model family to measure; repeat for several (default: each in turn)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--what-if", action="store_true", help="also time the engine without some of its costs")
    parser.add_argument("--parts", action="store_true", help="also time the pieces of each side's step")
    parser.add_argument("--aa", action="store_true", help="also interleave two hand loops (checks the method)")
    parser.add_argument("--profile", action="store_true", help="also profile one engine run with cProfile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="vt-engine-bench-") as tmp:
        for family in args.family or list(CASES):
            (Path(tmp) / family).mkdir()
            bench_family(CASES[family], Path(tmp) / family, args)


if __name__ == "__main__":
    main()
