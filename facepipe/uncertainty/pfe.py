"""PFE: Probabilistic Face Embeddings (Shi & Jain, ICCV 2019).

Each face is a Gaussian N(μ, diag σ²) with μ the frozen backbone's unit embedding and σ² predicted per
dimension by a small head. Pairs are compared with the mutual likelihood score (MLS), and the head is
trained by maximising the MLS of genuine pairs. Conventions follow the authors' code (golden case 05):
the ½ and the −D/2·log 2π constants of the paper's log-likelihood are dropped (a monotone change).

Uncertainty ``u`` for this method is σ² of shape (N, D); the head returns log σ².
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

NAME = "pfe"
LOSS_EPS = 1e-10  # added to σ²_i + σ²_j in the loss denominator, as the authors' TF loss does
_FLOOR = math.log(1e-6)  # log σ² = log(1e-6 + exp(raw)): σ² never reaches 0
FUSION_RULES = ("paper", "min")
# σ²_a + σ²_b is clamped here before dividing and taking logs, so a σ² of exactly 0 (or an underflowed
# exp) gives a large finite score instead of inf/NaN. Real heads floor σ² at 1e-6, far above it.
VAR_FLOOR = 1e-12


def as_tensors(*arrays: object) -> tuple[Tensor, ...]:
    """numpy arrays or tensors → tensors (no copy for tensors), so scores accept either."""
    return tuple(a if torch.is_tensor(a) else torch.as_tensor(a) for a in arrays)


def rowwise_dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_k a_ik·b_ik for row-aligned (N, D) tensors.

    Without autograd on CPU this goes through numpy's einsum, which streams both arrays once; torch's
    row-wise reductions were 5-8× slower on the 2-core test machine (65536×512 float32: 0.04 s vs 0.3 s).
    """
    if a.device.type == "cpu" and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
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


class PFEHead(LogVarianceHead):
    """PFE head: per-dimension log σ² (out_dim = embedding size), β initialised at −7 as the authors."""

    def __init__(self, in_features: int, embedding_size: int, **kw) -> None:
        kw.setdefault("beta_init", -7.0)
        super().__init__(in_features, embedding_size, **kw)


def build_head(in_features: int, embedding_size: int, **kw) -> PFEHead:
    return PFEHead(in_features, embedding_size, **kw)


def to_uncertainty(head_output: Tensor) -> Tensor:
    """Head output (log σ²) → σ²."""
    return torch.exp(head_output)


def uncertainty_scalar(sigma_sq: Tensor) -> Tensor:
    """Per-image scalar uncertainty: the mean σ² over dimensions (larger = less certain)."""
    return sigma_sq.reshape(sigma_sq.shape[0], -1).mean(dim=1)


def pair_score(
    mu_a: Tensor, sigma_sq_a: Tensor, mu_b: Tensor, sigma_sq_b: Tensor, eps: float = 0.0
) -> Tensor:
    """MLS of row-aligned pairs, higher = more alike: −Σ_k[(μa−μb)²/(σ²a+σ²b+eps) + log(σ²a+σ²b)].

    Shapes (N, D) each; σ² may also be (N, 1) (broadcast). The authors' numpy score uses eps = 0.
    """
    mu_a, sigma_sq_a, mu_b, sigma_sq_b = as_tensors(mu_a, sigma_sq_a, mu_b, sigma_sq_b)
    var = torch.clamp(sigma_sq_a + sigma_sq_b, min=VAR_FLOOR)
    diff = mu_a - mu_b
    # a (N, 1) σ² broadcasts: its log term then counts once per dimension, as in the per-dimension model
    return -(diff * diff / (var + eps) + torch.log(var)).sum(dim=-1)


def score_matrix(
    mu_a: Tensor,
    sigma_sq_a: Tensor,
    mu_b: Tensor,
    sigma_sq_b: Tensor,
    *,
    eps: float = 0.0,
    max_elements: int = 1 << 24,
) -> Tensor:
    """MLS of every a against every b, (Na, Nb). Rows are processed in blocks of ≤ max_elements floats."""
    mu_a, sigma_sq_a, mu_b, sigma_sq_b = as_tensors(mu_a, sigma_sq_a, mu_b, sigma_sq_b)
    na, nb, d = mu_a.shape[0], mu_b.shape[0], mu_a.shape[1]
    block = max(1, max_elements // max(1, nb * d))
    out = []
    for start in range(0, na, block):
        ma, sa = mu_a[start : start + block, None, :], sigma_sq_a[start : start + block, None, :]
        var = torch.clamp(sa + sigma_sq_b[None], min=VAR_FLOOR)
        diff = ma - mu_b[None]
        out.append(-(diff * diff / (var + eps) + torch.log(var)).sum(dim=-1))
    return torch.cat(out, 0) if out else mu_a.new_zeros((0, nb))


def genuine_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Indices (i, j), i ≠ j, of every ordered same-label pair in a batch."""
    labels = labels.reshape(-1)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    i, j = torch.nonzero(same, as_tuple=True)
    return i, j


def loss(mu: Tensor, log_sigma_sq: Tensor, labels: Tensor, **_: object) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean −MLS over all ordered genuine pairs (i, j), i ≠ j, of a P×K batch (the authors' TF loss).

    Only genuine pairs are gathered, so memory is O(B·(K−1)·D) rather than O(B²·D).
    Raises ValueError when the batch holds no genuine pair (the loss would be an empty mean).
    """
    i, j = genuine_pairs(labels)
    if i.numel() == 0:
        raise ValueError("PFE loss needs at least two images of one class in the batch (no genuine pair)")
    sigma_sq = torch.exp(log_sigma_sq)
    neg_mls = -pair_score(mu[i], sigma_sq[i], mu[j], sigma_sq[j], eps=LOSS_EPS)
    total = neg_mls.mean()
    return total, {"mls": total.detach()}


def fuse(
    mu: Tensor,
    sigma_sq: Tensor,
    *,
    rule: Literal["paper", "min"] = "paper",
    normalize: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Fuse a template of n images (n, D) into one Gaussian (D,).

    ``rule="paper"`` (default): σ²_t = 1/Σ(1/σ²_i), μ_t = σ²_t·Σ μ_i/σ²_i (product of Gaussians);
    μ is left un-normalised unless ``normalize=True``.
    ``rule="min"`` (the authors' aggregate_PFE): μ_t as above then L2-normalised as μ/(‖μ‖+1e-8), σ²_t =
    per-dimension minimum over the set.
    An empty template raises ValueError (there is nothing to describe); one image returns itself.
    """
    mu, sigma_sq = as_tensors(mu, sigma_sq)
    if rule not in FUSION_RULES:
        raise ValueError(f"unknown PFE fusion rule {rule!r}; choose from {FUSION_RULES}")
    if mu.ndim != 2 or mu.shape[0] == 0:
        raise ValueError(f"cannot fuse an empty template (mu has shape {tuple(mu.shape)})")
    sigma_sq = sigma_sq.expand_as(mu)
    precision = 1.0 / torch.clamp(sigma_sq, min=VAR_FLOOR / 2)
    weights = precision / precision.sum(dim=0, keepdim=True)
    mu_t = (weights * mu).sum(dim=0)
    if rule == "paper":
        sigma_sq_t = 1.0 / precision.sum(dim=0)
        if normalize:
            mu_t = mu_t / (mu_t.norm() + 1e-8)
    else:
        sigma_sq_t = sigma_sq.min(dim=0).values
        if normalize is None or normalize:
            mu_t = mu_t / (mu_t.norm() + 1e-8)
    return mu_t, sigma_sq_t
