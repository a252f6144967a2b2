"""PFE: Probabilistic Face Embeddings (Shi & Jain, ICCV 2019).

Each face is a Gaussian N(μ, diag σ²) with μ the frozen backbone's unit embedding and σ² predicted per
dimension by a small head. Pairs are compared with the mutual likelihood score (MLS), and the head is
trained by maximising the MLS of genuine pairs. Conventions follow the authors' code (golden case 05):
the ½ and the −D/2·log 2π constants of the paper's log-likelihood are dropped (a monotone change).

Uncertainty ``u`` for this method is σ² of shape (N, D); the head returns log σ².
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from facepipe.uncertainty.common import VAR_FLOOR, LogVarianceHead, as_tensors, no_autograd_on_cpu

NAME = "pfe"
LOSS_EPS = 1e-10  # added to σ²_i + σ²_j in the loss denominator, as the authors' TF loss does
FUSION_RULES = ("paper", "min")


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
    parts = (mu_a, sigma_sq_a, mu_b, sigma_sq_b)
    if no_autograd_on_cpu(*parts) and sigma_sq_a.shape == mu_a.shape == sigma_sq_b.shape:
        return torch.from_numpy(_pair_score_numpy(*(t.detach().numpy() for t in parts), eps))
    var = torch.clamp(sigma_sq_a + sigma_sq_b, min=VAR_FLOOR)
    diff = mu_a - mu_b
    # a (N, 1) σ² broadcasts: its log term then counts once per dimension, as in the per-dimension model
    return -(diff * diff / (var + eps) + torch.log(var)).sum(dim=-1)


def _pair_score_numpy(
    mu_a: np.ndarray, var_a: np.ndarray, mu_b: np.ndarray, var_b: np.ndarray, eps: float
) -> np.ndarray:
    """`pair_score` for per-dimension σ² on CPU without autograd: in place on two temporaries.

    Evaluation scores millions of pairs this way (IJB-C); on the 2-core test machine the same formula
    through torch's element-wise ops took ~14x longer (`bench/eval.py`, template_mls).
    """
    var = np.add(var_a, var_b)
    np.maximum(var, VAR_FLOOR, out=var)
    diff = np.subtract(mu_a, mu_b)
    np.square(diff, out=diff)
    np.divide(diff, var + eps if eps else var, out=diff)
    quad = diff.sum(axis=-1)
    np.log(var, out=var)
    return -(quad + var.sum(axis=-1))


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
