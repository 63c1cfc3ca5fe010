"""HiDream's mixture-of-experts load-balancing loss, as diffusers' MoEGate computes it.

In training mode each MoEGate (one per block of both stacks, where the config has routed experts)
computes, unless its ``alpha`` is 0, ``alpha * sum_i(P_i * f_i)`` over its experts i: P_i the routing
probability of expert i averaged over every token, f_i the share of the tokens' top-k choices that
went to i times the number of experts (1 for each under an even spread). diffusers returns it from
the gate and MOEFeedForwardSwiGLU drops it (its ``AddAuxiliaryLoss`` line is commented out), so it
never reaches a loss by itself. Here each gate's alpha is transformer.moe_aux_loss_weight (0: the
gate skips the computation), and `collected_aux_losses` takes the gates' outputs during one forward
call for the adapter to hand to the loop. Only P_i carries a gradient (f_i counts a top-k choice):
it reaches the gate's weight and, through the gate's input, whatever trains upstream (LoRA too).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def gates(transformer: Any) -> list[Any]:
    from diffusers.models.transformers.transformer_hidream_image import MoEGate

    return [module for module in transformer.modules() if isinstance(module, MoEGate)]


def set_aux_loss_weight(transformer: Any, weight: float) -> None:
    """Every MoE gate's alpha: the weight its auxiliary loss is computed with (0: not computed)."""
    for gate in gates(transformer):
        gate.alpha = float(weight)


@contextmanager
def collected_aux_losses(transformer: Any) -> Iterator[list[torch.Tensor]]:
    """The auxiliary losses (already times alpha) the gates return during the block, in call order."""
    losses: list[torch.Tensor] = []

    def keep(_module: Any, _inputs: Any, output: tuple) -> None:
        if output[2] is not None:
            losses.append(output[2])

    handles = [gate.register_forward_hook(keep) for gate in gates(transformer)]
    try:
        yield losses
    finally:
        for handle in handles:
            handle.remove()
