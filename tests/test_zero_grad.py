"""The loop's zero_grad (core/train/loop.py zero_grad_of) does what accelerate's wrapper does."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from core.train.loop import zero_grad_of


def _reset() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_gradients_are_kept_between_accumulated_micro_batches_and_dropped_at_the_step() -> None:
    _reset()
    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = torch.nn.Linear(3, 1)
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        zero_grad = zero_grad_of(optimizer, accelerator)
        seen = []
        for _ in range(4):
            with accelerator.accumulate(model):
                accelerator.backward(model(torch.ones(1, 3)).sum())
                optimizer.step()
                zero_grad()
                seen.append(model.weight.grad is None)
        assert seen == [False, True, False, True]  # kept after the first micro-batch, dropped after the step
    finally:
        _reset()


def test_an_optimizer_without_set_to_none_is_called_as_it_is() -> None:
    calls = []

    class Plain:
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append(set_to_none)

    zero_grad_of(Plain(), accelerator=None)()
    assert calls == [True]
