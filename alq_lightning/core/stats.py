"""AMSGrad statistics and the diagonal quadratic loss model they define.

With gradient ``g`` at step ``t`` (``t`` counts updates, starting at 1)::

    m ← β1 m + (1-β1) g      v ← β2 v + (1-β2) g²      v̄ ← max(v̄, v)
    p = lr · m / (1 - β1^t)   h = (sqrt(v̄) + eps) / sqrt(1 - β2^t)

so that ``ℓ(x + d) ≈ ℓ(x) + pᵀd + ½ dᵀ diag(h) d`` and one AMSGrad step is ``d = -p / h``. The step count
``t`` is held by the caller (a plain integer), so updating never synchronises with an accelerator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuadraticConfig:
    """Hyper-parameters of the quadratic model: ``betas`` and ``eps`` of AMSGrad."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1)")
        if self.eps <= 0:
            raise ValueError(f"eps={self.eps} must be > 0")


@dataclass
class AmsgradStats:
    """First moment ``m``, second moment ``v`` and its running maximum ``vmax``, all of one shape."""

    m: torch.Tensor
    v: torch.Tensor
    vmax: torch.Tensor

    @classmethod
    def zeros_like(cls, like: torch.Tensor) -> AmsgradStats:
        return cls(torch.zeros_like(like), torch.zeros_like(like), torch.zeros_like(like))

    def rows(self, groups: slice) -> AmsgradStats:
        """The statistics of ``groups`` only, as views."""
        return AmsgradStats(self.m[groups], self.v[groups], self.vmax[groups])

    def reset(self) -> None:
        for tensor in (self.m, self.v, self.vmax):
            tensor.zero_()


def update_stats(stats: AmsgradStats, grad: torch.Tensor, config: QuadraticConfig) -> None:
    """Fold ``grad`` (the shape of the statistics) into ``stats`` in place."""
    stats.m.lerp_(grad, 1 - config.beta1)
    stats.v.mul_(config.beta2).addcmul_(grad, grad, value=1 - config.beta2)
    torch.maximum(stats.vmax, stats.v, out=stats.vmax)


def quadratic_model(
    stats: AmsgradStats, step: int, lr: float, config: QuadraticConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, h)``: pseudo-gradient and pseudo-Hessian (diagonal), each of the statistics' shape.

    ``step`` is the number of updates folded in so far (``t >= 1``).
    """
    if step < 1:
        raise ValueError(f"step={step} must be >= 1: fold at least one gradient in first")
    p = stats.m * (lr / (1 - config.beta1**step))
    h = (stats.vmax.sqrt() + config.eps) / (1 - config.beta2**step) ** 0.5
    return p, h
