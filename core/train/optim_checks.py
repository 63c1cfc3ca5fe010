"""Whether an optimizer can run here, asked before a run starts so the answer is a message, not a traceback.

bitsandbytes >= 0.45 ships CPU kernels for its 8-bit optimizers (0.50.2, the version this project is
tested with, runs AdamW8bit on CPU tensors: the state is uint8 with float32 block maxima, exactly as on
CUDA). Older builds raise inside step() on CPU tensors, so the check runs one tiny step and reports
what failed instead of trusting the version number.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _bnb_cpu_problem() -> str | None:
    """None when bitsandbytes' AdamW8bit takes a step on a CPU tensor, else why not (once per process)."""
    try:
        import bitsandbytes as bnb
        import torch
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native library raising anything
        return f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc})"
    try:
        # 4096 elements: bitsandbytes keeps smaller tensors' state in 32 bits (min_8bit_size), which
        # would not exercise the 8-bit kernels at all.
        weight = torch.nn.Parameter(torch.zeros(64, 64))
        weight.grad = torch.ones_like(weight)
        bnb.optim.AdamW8bit([weight], lr=1e-3).step()
        if not bool(weight.detach().ne(0).any()):
            return "bitsandbytes' AdamW8bit did not change a CPU weight"
    except Exception as exc:  # noqa: BLE001 - whatever the kernels raise is the answer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run AdamW8bit on CPU tensors ({first[:200]})"
    return None


def optimizer_problem(name: str, cuda: bool) -> str | None:
    """One line saying why optimizer `name` cannot run on this machine, or None when it can.

    `cuda`: whether the weights will live on a CUDA device (bitsandbytes' CUDA kernels are then used,
    and only its importability is checked; its CPU kernels are checked with one tiny step).
    """
    if name in ("ADAMW", "SGD", "ADAFACTOR"):
        return None  # torch and transformers: always installed
    if name == "PRODIGY":
        if importlib.util.find_spec("prodigyopt") is None:
            return "optimizer PRODIGY needs the prodigyopt package, which is not installed; install it or choose ADAMW"
        return None
    if name == "ADAMW_8BIT":
        if cuda:
            if importlib.util.find_spec("bitsandbytes") is None:
                return "optimizer ADAMW_8BIT needs bitsandbytes, which is not installed; install it or choose ADAMW or ADAFACTOR"
            return None
        problem = _bnb_cpu_problem()
        if problem:
            log.info("ADAMW_8BIT unavailable on CPU: %s", problem)
            return f"optimizer ADAMW_8BIT cannot train without a CUDA GPU here: {problem}; choose ADAMW or ADAFACTOR"
        return None
    return f"unknown optimizer {name!r}; choose ADAMW, ADAMW_8BIT, ADAFACTOR, PRODIGY or SGD"
