"""HiDream's MoE load-balancing loss: off by default (the gates compute nothing and the loss is the
objective's alone), and with transformer.moe_aux_loss_weight above 0 the gates' auxiliary loss, as
diffusers' MoEGate defines it, times the weight, is added to the training loss and moves the weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from numerics import EPS32

from core.models.hidream import HiDreamAdapter
from core.train.metrics_reader import read_metrics
from core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_hd(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("hidream")


def _adapter(folder: Path, weight: float) -> HiDreamAdapter:
    adapter = HiDreamAdapter(folder)
    adapter.configure({"transformer": {"moe_aux_loss_weight": weight}})
    for name in adapter.text_encoder_names:
        adapter.load_text_encoder("cpu", torch.float32, name=name)
    return adapter


def _balance_loss(gate: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """sum_i P_i * f_i of one gate's input, written out from DeepSeek's definition: P_i the mean routing
    probability, f_i the share of top-k choices for expert i times the number of experts."""
    scores = (tokens.reshape(-1, tokens.shape[-1]) @ gate.weight.T).softmax(dim=-1)
    chosen = scores.topk(gate.top_k, dim=-1).indices.reshape(-1)
    share = torch.bincount(chosen, minlength=gate.n_routed_experts).float() / chosen.numel()
    return (scores.mean(0) * share * gate.n_routed_experts).sum()


def test_the_weight_adds_each_gates_balance_loss_times_it(tiny_hd: Path) -> None:
    from core.models.hidream_moe import gates

    weight = 0.5
    adapter = _adapter(tiny_hd, weight)
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32).train()
    moe = gates(transformer)
    assert len(moe) == 3 and all(g.alpha == weight for g in moe)
    inputs: list[torch.Tensor] = []
    handles = [g.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach())) for g in moe]
    text = adapter.encode_text(["a cat"])
    noisy = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    adapter.predict(transformer, noisy, torch.tensor([0.5]), text)
    for handle in handles:
        handle.remove()
    aux = adapter.auxiliary_loss(transformer)
    assert adapter.auxiliary_loss(transformer) is None  # taking it clears it
    expected = weight * sum(_balance_loss(g, x) for g, x in zip(moe, inputs, strict=True))
    # A few dozen float32 roundings over sums of order 1 (softmax, means, the sum over experts).
    torch.testing.assert_close(aux, expected, rtol=64 * EPS32, atol=0)
    assert aux > 0
    # Its gradient reaches the gates' weights (P_i carries it; the top-k counts do not).
    for gate in moe:
        gate.weight.requires_grad_(True)
    adapter.predict(transformer, noisy, torch.tensor([0.5]), text)
    adapter.auxiliary_loss(transformer).backward()
    assert all(g.weight.grad is not None and g.weight.grad.abs().max() > 0 for g in moe)
    # In eval mode (validation, samples) the gates compute none.
    transformer.eval()
    adapter.predict(transformer, noisy, torch.tensor([0.5]), text)
    assert adapter.auxiliary_loss(transformer) is None


def test_off_by_default_computes_nothing(tiny_hd: Path) -> None:
    adapter = _adapter(tiny_hd, 0.0)
    transformer = adapter.load_transformer("transformer", "cpu", torch.float32).train()
    adapter.predict(transformer, torch.randn(1, 16, 1, 4, 4), torch.tensor([0.5]), adapter.encode_text(["a cat"]))
    assert adapter.auxiliary_loss(transformer) is None


@pytest.mark.parametrize("checkpointing", ["OFF", "ON"])
def test_a_run_with_the_weight_adds_it_to_the_logged_loss_and_trains_other_weights(
        tiny_hd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpointing: str) -> None:
    from media_factory import make_image
    from safetensors.torch import load_file
    from test_hidream import hd_config

    data = tmp_path / "image"
    data.mkdir()
    make_image(data / "image.png", width=64, height=64, index=3)
    (data / "image.txt").write_text("a gray square", encoding="utf-8")
    taken: list[torch.Tensor | None] = []
    original = HiDreamAdapter.auxiliary_loss

    def recording(self, transformer):
        loss = original(self, transformer)
        taken.append(None if loss is None else loss.detach())
        return loss

    monkeypatch.setattr(HiDreamAdapter, "auxiliary_loss", recording)
    runs = {}
    for weight in (0.0, 0.5):
        root = tmp_path / str(weight)
        config = hd_config(tiny_hd, data, root, max_steps=3, learning_rate=0.01, gradient_checkpointing=checkpointing,
                           transformer={"moe_aux_loss_weight": weight})
        taken.clear()
        (path,) = Trainer(config).run().output_paths
        runs[weight] = (list(taken), [r["loss"] for r in read_metrics(root / "workspace" / "metrics.jsonl")], load_file(path))
    (off_aux, off_loss, off_lora), (on_aux, on_loss, on_lora) = runs[0.0], runs[0.5]
    assert off_aux == [None] * 3 and all(a is not None and a > 0 for a in on_aux) and len(on_aux) == 3
    # Step 1 starts from the same weights and noise: the logged losses differ by the auxiliary loss alone.
    assert on_loss[0] == pytest.approx(off_loss[0] + float(on_aux[0]), rel=8 * EPS32)
    # Its gradient moved the LoRA (upstream of the gates) elsewhere by the last step.
    assert any(not torch.equal(on_lora[k], off_lora[k]) for k in off_lora)

