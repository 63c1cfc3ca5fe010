"""Does loading cached batches cost little next to a training step, and do workers keep up?

With the tiny Wan 2.1 model (built into a temporary folder), in one process:

1. Cold epoch: every batch is made by encoding its samples (random frames through the VAE, the
   captions through UMT5) and writing the cache, then loading it back; a training step follows.
2. Warm epoch: the same batches through make_loader (num_workers=0), alternating with training
   steps; the load time of a batch is compared with the step that follows it: (a)/(b).
3. Workers: the same again with num_workers=2 while training; the time the loop waits for the
   next batch is measured against the step time.

The training step is a minimal flow-matching step of the tiny WanTransformer3DModel: noise,
sigma ~ U(0, 1), x_t = (1 - sigma) x + sigma noise, forward with encoder_hidden_states, MSE
against (noise - latents), backward, AdamW. Decoding clips is not part of the cold epoch (the
frames are random tensors), which only makes the cold epoch faster than a real one.

    python benchmarks/cache_load.py [--samples 32] [--batch 2] [--epochs-warm 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from core.data.buckets import BucketBatchSampler  # noqa: E402
from core.data.cache import LatentCache, TextCache, latent_key, seed_from_key, text_key  # noqa: E402
from core.data.dataset import CachedSample, CachedSampleDataset, collate_batch, make_loader  # noqa: E402
from core.models.tiny import build_tiny_model  # noqa: E402
from core.models.wan import WanAdapter  # noqa: E402

BUCKET = (9, 64, 64)  # 9 frames at 64x64 -> latents (16, 3, 8, 8)
WORDS = "a cat dog walks runs across the street beach at sunset slow camera pan drone shot over mountains".split()


class Trainer:
    """The tiny transformer with AdamW: one flow-matching step per batch."""

    def __init__(self, folder: Path, seed: int) -> None:
        from diffusers import WanTransformer3DModel

        self.model = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer").train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.generator = torch.Generator().manual_seed(seed)

    def step(self, batch: dict) -> float:
        latents, embeds = batch["latents"], batch["prompt_embeds"]
        noise = torch.randn(latents.shape, generator=self.generator)
        sigma = torch.rand((latents.shape[0],), generator=self.generator)
        noisy = (1 - sigma.view(-1, 1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1, 1) * noise
        pred = self.model(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=embeds, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def make_samples(adapter: WanAdapter, count: int) -> tuple[dict[int, CachedSample], dict[int, str]]:
    rng = torch.Generator().manual_seed(1)
    samples, captions = {}, {}
    for i in range(count):
        words = [WORDS[j] for j in torch.randint(len(WORDS), (6 + i % 20,), generator=rng).tolist()]
        captions[i] = " ".join(words)
        times = [k / 24 for k in range(BUCKET[0])]
        key = latent_key(f"{i:064x}", adapter.vae_identity(), BUCKET, times, False, 0, vae_dtype="float32")
        samples[i] = CachedSample((key,), text_key(captions[i], adapter.text_identity(), adapter.max_text_length))
    return samples, captions


def encode_missing(adapter: WanAdapter, cache_dir: Path, ids: list[int], samples: dict, captions: dict) -> None:
    """What the caching pass does for a sample: encode its frames and caption if not cached."""
    latents_cache, text_cache = LatentCache(cache_dir), TextCache(cache_dir)
    for i in ids:
        sample = samples[i]
        key = sample.latent_keys[0]
        if not latents_cache.has(key):
            frames = torch.rand((1, 3, *BUCKET), generator=torch.Generator().manual_seed(i)) * 2 - 1
            latents = adapter.encode_video(frames, torch.Generator().manual_seed(seed_from_key(key)))
            latents_cache.put(key, {"latents": latents[0]})
        if not text_cache.has(sample.text_key):
            out = adapter.encode_text([captions[i]])
            text_cache.put_text(sample.text_key, out["prompt_embeds"][0], out["prompt_mask"][0])


def waits_with_workers(dataset: CachedSampleDataset, batches: list, step: Callable[[dict], object]) -> tuple[float, list[float], list[float]]:
    """(first batch's wait, each later wait for a batch, each step's time) with num_workers=2."""
    loader = make_loader(dataset, batches, 2, pin_memory=False, seed=0, frame_dropout_probability=0.1)
    start = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    first_wait = time.perf_counter() - start
    step(first)
    waits, steps = [], []
    while True:
        start = time.perf_counter()
        batch = next(iterator, None)
        if batch is None:
            return first_wait, waits, steps
        waits.append(time.perf_counter() - start)
        start = time.perf_counter()
        step(batch)
        steps.append(time.perf_counter() - start)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vt-cache-bench-") as tmp:
        run(Path(tmp))


def run(work: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--epochs-warm", type=int, default=3, help="warm epochs per measurement (more = steadier)")
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = build_tiny_model("wan21", work / "wan21")
    cache_dir = work / "cache"
    adapter = WanAdapter(folder)
    adapter.load_vae("cpu", torch.float32)
    adapter.load_text_encoder("cpu", torch.float32)
    trainer = Trainer(folder, seed=0)
    samples, captions = make_samples(adapter, args.samples)
    dataset = CachedSampleDataset(samples, cache_dir)
    records = [(i, BUCKET, 1, True) for i in samples]
    passes = 1 + 3 * args.epochs_warm
    sampler = BucketBatchSampler(records, args.batch * 2, 0.5, seed=0, steps=passes * args.samples // args.batch)
    per_pass = sampler.per_pass
    batches = list(sampler)

    # Warm-up outside the measurements: first calls of the transformer allocate and dispatch.
    warm_batch = collate_batch([{"latents": torch.zeros(16, 3, 8, 8), "prompt_embeds": torch.zeros(512, 32),
                                 "prompt_mask": torch.zeros(512, dtype=torch.bool), "sample_id": 0, "variant": 0, "step": 0}] * args.batch)  # fmt: skip
    for _ in range(3):
        trainer.step(warm_batch)

    # 1. Cold epoch: encode + write + read back per batch.
    cold_data, cold_steps = 0.0, []
    for batch in batches[:per_pass]:
        start = time.perf_counter()
        encode_missing(adapter, cache_dir, [sid for sid, _ in batch.samples], samples, captions)
        loaded = collate_batch([dataset[(sid, use, batch.step)] for sid, use in batch.samples])
        cold_data += time.perf_counter() - start
        start = time.perf_counter()
        trainer.step(loaded)
        cold_steps.append(time.perf_counter() - start)
    adapter.unload_encoders()

    # 2. Warm epochs, num_workers=0: each batch's load time against the step that follows it.
    loads, steps = [], []
    warm_batches = batches[per_pass : per_pass * (1 + args.epochs_warm)]
    iterator = iter(make_loader(dataset, warm_batches, 0, pin_memory=False, seed=0, frame_dropout_probability=0.1))
    while True:
        start = time.perf_counter()
        batch = next(iterator, None)
        if batch is None:
            break
        loads.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.step(batch)
        steps.append(time.perf_counter() - start)
    warm_epoch_data = sum(loads) / args.epochs_warm

    # 3. Warm epochs, num_workers=2: how long the loop waits for the next batch, while training,
    # and while idle for as long as a step takes (as a GPU step leaves the CPU): the latter is the
    # hand-over cost alone, with no contention for the CPU.
    rest = batches[per_pass * (1 + args.epochs_warm) :]
    half = len(rest) // 2
    first_wait, waits, worker_steps = waits_with_workers(dataset, rest[:half], trainer.step)
    idle_step = statistics.median(steps)
    _, idle_waits, _ = waits_with_workers(dataset, rest[half:], lambda batch: time.sleep(idle_step))

    med = statistics.median
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.samples} samples, batch {args.batch}, bucket {BUCKET} -> latents (16, 3, 8, 8), text (512, 32)")  # fmt: skip
    print(f"(a) warm batch load, num_workers=0   median {med(loads) * 1e3:8.2f} ms  (n={len(loads)})")
    print(f"(b) training step                     median {med(steps) * 1e3:8.2f} ms")
    print(f"    (a)/(b)                                  {med(loads) / med(steps) * 100:8.2f} %   target < 5 %")
    print(f"cold epoch data time (encode + cache)        {cold_data:8.3f} s   ({per_pass} batches)")
    print(f"warm epoch data time (read cache)            {warm_epoch_data:8.3f} s")
    print(f"    warm / cold                              {warm_epoch_data / cold_data * 100:8.2f} %   target < 10 %")
    print(f"num_workers=2: first batch (worker start)    {first_wait * 1e3:8.1f} ms")
    print(f"num_workers=2: wait for next batch           median {med(waits) * 1e3:6.2f} ms, "
          f"max {max(waits) * 1e3:6.2f} ms, total {sum(waits) / sum(worker_steps) * 100:5.2f} % of step time "
          f"(step median {med(worker_steps) * 1e3:.1f} ms, n={len(waits)})")
    print(f"num_workers=2, CPU idle during the step: wait median {med(idle_waits) * 1e3:6.2f} ms, "
          f"max {max(idle_waits) * 1e3:6.2f} ms (n={len(idle_waits)})")  # fmt: skip


if __name__ == "__main__":
    main()
