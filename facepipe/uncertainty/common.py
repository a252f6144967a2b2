"""Pieces several uncertainty methods share: tensor conversion, row-wise dot, the log-variance head.

PFE, ProbFace (and DUL) predict log σ² with the same FC → BN → ReLU → FC → BN → γ, β head; SCF and the
Gaussian methods all score row-aligned pairs through `rowwise_dot`. Keeping them here lets each method
file hold only what is its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

_FLOOR = math.log(1e-6)  # log σ² = log(1e-6 + exp(raw)): σ² never reaches 0
# σ²_a + σ²_b is clamped here before dividing and taking logs, so a σ² of exactly 0 (or an underflowed
# exp) gives a large finite score instead of inf/NaN. Real heads floor σ² at 1e-6, far above it.
VAR_FLOOR = 1e-12


def as_tensors(*arrays: object) -> tuple[Tensor, ...]:
    """numpy arrays or tensors → tensors (no copy for tensors), so scores accept either."""
    return tuple(a if torch.is_tensor(a) else torch.as_tensor(a) for a in arrays)


def no_autograd_on_cpu(*tensors: Tensor) -> bool:
    """True when numpy may compute on these tensors: all on CPU and no gradient is wanted through them."""
    if any(t.device.type != "cpu" for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def rowwise_dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_k a_ik·b_ik for row-aligned (N, D) tensors.

    Without autograd on CPU this goes through numpy's einsum, which streams both arrays once; torch's
    row-wise reductions were 5-8× slower on the 2-core test machine (65536×512 float32: 0.04 s vs 0.3 s).
    """
    if no_autograd_on_cpu(a, b):
        return torch.from_numpy(np.einsum("ij,ij->i", a.detach().numpy(), b.detach().numpy()))
    return torch.einsum("ij,ij->i", a, b)


def _log_eps_plus_exp(raw: Tensor) -> Tensor:
    # log(1e-6 + e^raw) written with softplus so it is stable and exports to ONNX as one op.
    return _FLOOR + F.softplus(raw - _FLOOR)


class ScaleShift(nn.Module):
    """One scalar γ and one scalar β shared by all output dimensions (the PFE/ProbFace output layer)."""

    def __init__(self, gamma: float, beta: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor(float(gamma)))
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * x + self.beta


class LogVarianceHead(nn.Module):
    """FC → BN → ReLU → FC → BN(no affine) → shared γ, β → log σ² (floored at log 1e-6).

    Input: the backbone's final conv map (N, C, H, W) or pre-embedding features (N, F); it is flattened.
    Output: (N, out_dim) log σ². BN settings mirror the TF-slim originals (decay 0.995, eps 1e-3).
    """

    def __init__(
        self,
        in_features: int,
        out_dim: int,
        *,
        hidden: int | None = None,
        gamma_init: float = 0.1,
        beta_init: float = -7.0,
    ) -> None:
        super().__init__()
        hidden = hidden or max(256, out_dim)
        self.in_features = in_features
        self.out_dim = out_dim
        self.fc1 = nn.Linear(in_features, hidden, bias=False)  # the BN after it supplies the shift
        self.bn1 = nn.BatchNorm1d(hidden, eps=1e-3, momentum=0.005)
        self.fc2 = nn.Linear(hidden, out_dim, bias=False)
        self.bn2 = nn.BatchNorm1d(out_dim, eps=1e-3, momentum=0.005, affine=False)
        self.scale_shift = ScaleShift(gamma_init, beta_init)

    def forward(self, features: Tensor) -> Tensor:
        x = torch.flatten(features, 1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"head expects {self.in_features} input features, got {x.shape[1]}")
        x = F.relu(self.bn1(self.fc1(x)))
        x = self.scale_shift(self.bn2(self.fc2(x)))
        return _log_eps_plus_exp(x)
