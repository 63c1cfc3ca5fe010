"""Tolerances for comparing two float32 computations of the same value that round differently.

Two code paths that compute the same mathematical value (a gradient and the formula for it, a frame
run alone and inside a clip, a LoRA trained and loaded again) may add the same terms in another
order, and the order is the CPU's business: torch picks its kernels by CPU capability
(ATEN_CPU_CAPABILITY: default, AVX2, AVX-512), and each vector width sums in its own order. A
tolerance measured on one CPU can fail on another, so the ones here follow from float32's rounding:
u = eps / 2 per operation, and the classic bound for a sum of n terms in any order,
|computed - exact| <= (n - 1) * u * sum(|terms|) (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., eq. 4.4). Two results that each meet it differ by at most twice that.

Real faults (a wrong sign, a frame that leaks, a lost LoRA) move the results by a good fraction of
their size, orders of magnitude beyond these bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EPS32 = torch.finfo(torch.float32).eps


def sum_tolerance(terms: torch.Tensor, dim: int | Sequence[int], roundings_per_term: int = 2) -> torch.Tensor:
    """How far apart two float32 sums of `terms` over `dim` may end by rounding alone.

    Each side adds n terms (n - 1 additions), each term itself the result of up to
    `roundings_per_term` rounded operations (a product, a difference): within
    (n - 1 + roundings_per_term) * u * sum(|terms|) of the exact sum, in whatever order. Two sides: twice.
    """
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    n = 1
    for d in dims:
        n *= terms.shape[d]
    return (n - 1 + roundings_per_term) * EPS32 * terms.abs().sum(dim=dims)


def mean_rtol(n: int, roundings_per_term: int = 2) -> float:
    """Relative tolerance between two float32 means (or sums) of n non-negative terms, any order.

    With no cancellation, sum(|terms|) is the sum itself, so sum_tolerance becomes relative; the
    division by n and a final weighting add a few roundings more.
    """
    return (n - 1 + roundings_per_term + 4) * EPS32


def forward_tolerance(model: torch.nn.Module) -> float:
    """Relative tolerance (of the output's largest magnitude) between two float32 forwards of model
    whose kernels sum in different orders.

    A linear or convolution layer with fan-in K computes K-term dot products: another order moves
    each by up to K * eps of the sum of its |terms| (twice (K - 1) * u). Through the layers these
    rounding errors add (the tiny models' random weights neither amplify nor damp them much), so the
    estimate is eps times the sum of all fan-ins: about 1e-4 (some 1000 ulps) for the tiny Wan
    transformer, whose outputs a real fault moves by 5 % or more.
    """
    fan_in = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            fan_in += module.in_features
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            kernel = 1
            for k in module.kernel_size:
                kernel *= k
            fan_in += module.in_channels // module.groups * kernel
    return fan_in * EPS32
