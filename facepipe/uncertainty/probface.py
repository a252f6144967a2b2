"""ProbFace (Chen et al. 2021): PFE with one scalar σ² per image and a discriminative term on the MLS.

Pair score (no factor D, as in the authors' code):  −[2(1−cos θ)/(σ²a+σ²b) + log(σ²a+σ²b)].
The loss adds to the genuine-pair MLS (μ stop-gradient) a triplet semi-hard loss (margin 3) on the
"attention" part 2(1−cos θ)/(σ²a+σ²b) and an output constraint keeping σ² near its batch mean.
Conventions follow the authors' code (golden case 06). Embeddings μ are expected L2-normalised.

Uncertainty ``u`` for this method is σ² of shape (N, 1); the head returns log σ².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from facepipe.uncertainty.common import VAR_FLOOR, LogVarianceHead, as_tensors, rowwise_dot

NAME = "probface"
LOSS_EPS = 1e-10  # in the attention denominator, as the authors' code
TRIPLET_MARGIN = 3.0
CONTRASTIVE_MARGIN = 3.0


@dataclass(frozen=True)
class LossWeights:
    """Weights of the ProbFace loss terms (configfig/resface64_msarcface.py of the authors)."""

    mls: float = 1.0
    discriminative: float = 0.001
    output_constraint: float = 0.001


class ProbFaceHead(LogVarianceHead):
    """ProbFace head: the PFE head with one output (scalar log σ²) and β initialised at −1."""

    def __init__(self, in_features: int, embedding_size: int = 512, **kw) -> None:
        kw.setdefault("beta_init", -1.0)
        kw.setdefault("hidden", max(256, embedding_size))
        super().__init__(in_features, 1, **kw)


def build_head(in_features: int, embedding_size: int, **kw) -> ProbFaceHead:
    return ProbFaceHead(in_features, embedding_size, **kw)


def to_uncertainty(head_output: Tensor) -> Tensor:
    """Head output (log σ²) → σ² (N, 1)."""
    return torch.exp(head_output)


def uncertainty_scalar(sigma_sq: Tensor) -> Tensor:
    """Per-image scalar uncertainty: σ² itself."""
    return sigma_sq.reshape(sigma_sq.shape[0], -1)[:, 0]


def _col(sigma_sq: Tensor) -> Tensor:
    return sigma_sq.reshape(-1)


def pair_score(
    mu_a: Tensor, sigma_sq_a: Tensor, mu_b: Tensor, sigma_sq_b: Tensor, *, attention_only: bool = False
) -> Tensor:
    """Score of row-aligned pairs (N,), higher = more alike; σ² given as (N,) or (N, 1)."""
    mu_a, sigma_sq_a, mu_b, sigma_sq_b = as_tensors(mu_a, sigma_sq_a, mu_b, sigma_sq_b)
    cos = rowwise_dot(mu_a, mu_b.to(mu_a.dtype))
    return score_from_cos(cos, sigma_sq_a, sigma_sq_b, attention_only=attention_only)


def score_from_cos(
    cos: Tensor, sigma_sq_a: Tensor, sigma_sq_b: Tensor, *, attention_only: bool = False
) -> Tensor:
    """The pair score from cos θ of unit μ and one σ² per image: −[2(1−cos)/(σ²a+σ²b) + log(σ²a+σ²b)].

    Evaluation uses it to score template × template with one GEMM (`facepipe.eval.scoring`).
    """
    cos, sigma_sq_a, sigma_sq_b = as_tensors(cos, sigma_sq_a, sigma_sq_b)
    var = torch.clamp(_col(sigma_sq_a) + _col(sigma_sq_b), min=VAR_FLOOR)
    return _mls(cos, var, attention_only)


def score_matrix(
    mu_a: Tensor, sigma_sq_a: Tensor, mu_b: Tensor, sigma_sq_b: Tensor, *, attention_only: bool = False
) -> Tensor:
    """Score of every a against every b (Na, Nb): one matrix product, memory O(Na·Nb)."""
    mu_a, sigma_sq_a, mu_b, sigma_sq_b = as_tensors(mu_a, sigma_sq_a, mu_b, sigma_sq_b)
    var = torch.clamp(_col(sigma_sq_a)[:, None] + _col(sigma_sq_b)[None, :], min=VAR_FLOOR)
    return _mls(mu_a @ mu_b.T, var, attention_only)


def _mls(cos: Tensor, var: Tensor, attention_only: bool) -> Tensor:
    """The score from cos θ and the floored σ²a+σ²b (pairs or a matrix; one formula for both)."""
    attention = 2.0 * (1.0 - cos) / (LOSS_EPS + var)
    return -attention if attention_only else -(attention + torch.log(var))


def triplet_semihard_loss(labels: Tensor, dist: Tensor, margin: float = TRIPLET_MARGIN) -> Tensor:
    """Triplet loss with semi-hard negative mining over a precomputed distance matrix (B, B).

    Same semantics as TensorFlow's (tf.contrib) ``triplet_semihard_loss``: for every anchor a and positive
    p ≠ a, the negative is the closest one farther than d(a,p); if none is, the farthest negative. The
    loss is Σ max(margin + d(a,p) − d(a,n), 0) / (number of (a,p) pairs). Only the anchor's own row of
    ``dist`` is used, so an asymmetric matrix is read the way TF reads it. An anchor with no negative
    at all falls back to the minimum of its row, as TF's masked maximum does.
    """
    labels = labels.reshape(-1)
    b = labels.shape[0]
    same = labels[:, None] == labels[None, :]
    negative = ~same
    n_negative = negative.sum(dim=1)
    # Each anchor's negative distances in ascending order (non-negatives pushed to the end as +inf);
    # a binary search then finds, for every positive, the first negative strictly farther than it.
    # O(B² log B) time and O(B²) memory, instead of the B³ mask TF builds.
    neg_sorted = torch.sort(torch.where(negative, dist, torch.full_like(dist, float("inf"))), dim=1).values
    first_farther = torch.searchsorted(
        neg_sorted.detach().contiguous(), dist.detach().contiguous(), right=True
    )
    has_farther = first_farther < n_negative[:, None]
    outside = torch.gather(neg_sorted, 1, first_farther.clamp(max=b - 1))
    last_negative = (n_negative - 1).clamp(min=0)[:, None]
    inside = torch.gather(neg_sorted, 1, last_negative)  # the farthest negative
    inside = torch.where(n_negative[:, None] > 0, inside, dist.amin(dim=1, keepdim=True))
    semi_hard = torch.where(has_farther, outside, inside)
    positive = same & ~torch.eye(b, dtype=torch.bool, device=same.device)
    n_pos = positive.sum()
    if n_pos == 0:
        raise ValueError("triplet loss needs at least two images of one class in the batch")
    per_pair = torch.clamp(margin + dist - semi_hard, min=0.0)
    return torch.where(positive, per_pair, torch.zeros_like(per_pair)).sum() / n_pos


def loss(
    mu: Tensor,
    log_sigma_sq: Tensor,
    labels: Tensor,
    *,
    weights: LossWeights = LossWeights(),
    discriminative: str = "triplet_semihard",
    **_: object,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ProbFace loss over a P×K batch: returns (total, terms).

    total = w_mls·MLS + w_disc·triplet_semihard(attention, margin 3) + w_oc·Σ(σ²/sg(mean σ²) − 1)².
    μ is stop-gradient (only the head learns). ``discriminative="contrastive"`` swaps the triplet term
    for mean(attention_pos) + mean(max(3 − attention_neg, 0)), the authors' alternative.
    """
    labels = labels.reshape(-1)
    b = labels.shape[0]
    mu = mu.detach()
    sigma_sq = torch.exp(log_sigma_sq).reshape(b)
    var = torch.clamp(sigma_sq[:, None] + sigma_sq[None, :], min=VAR_FLOOR)
    attention = 2.0 * (1.0 - mu @ mu.T) / (LOSS_EPS + var)
    neg_mls = attention + torch.log(var)
    same = labels[:, None] == labels[None, :]
    off_diag = ~torch.eye(b, dtype=torch.bool, device=mu.device)
    pos, neg = same & off_diag, ~same
    if not pos.any():
        raise ValueError("ProbFace loss needs at least two images of one class in the batch")
    mls = neg_mls[pos].mean()
    att_pos = attention[pos].mean()
    att_neg = attention[neg].mean() if neg.any() else attention.new_tensor(float("nan"))
    if discriminative == "triplet_semihard":
        disc = triplet_semihard_loss(labels, attention, TRIPLET_MARGIN)
    elif discriminative == "contrastive":
        disc = att_pos + torch.clamp(CONTRASTIVE_MARGIN - attention[neg], min=0.0).mean()
    else:
        raise ValueError(f"unknown discriminative term {discriminative!r}")
    constraint = ((sigma_sq / torch.clamp(sigma_sq.mean().detach(), min=VAR_FLOOR) - 1.0) ** 2).sum()
    total = weights.mls * mls + weights.discriminative * disc + weights.output_constraint * constraint
    terms = {
        "mls": mls.detach(),
        "discriminative": disc.detach(),
        "output_constraint": (weights.output_constraint * constraint).detach(),
        "attention_pos": att_pos.detach(),
        "attention_neg": att_neg.detach(),
    }
    return total, terms


def fuse(
    mu: Tensor, sigma_sq: Tensor, *, temperature: float = 1.0, normalize: bool = True
) -> tuple[Tensor, Tensor]:
    """Fuse a template (n, D), σ² (n, 1) → μ (D,), σ² (1,).

    Weights w_i ∝ (1/σ²_i)^(1/T) (computed as exp(log(1/σ² + 1e-6)/T), the authors' form); μ_t = Σ w_i μ_i,
    L2-normalised as μ/(‖μ‖+1e-8); σ²_t = Σ w_i σ²_i (the weighted mean, not PFE's minimum).
    An empty template raises ValueError; a single image returns itself.
    """
    mu, sigma_sq = as_tensors(mu, sigma_sq)
    if mu.ndim != 2 or mu.shape[0] == 0:
        raise ValueError(f"cannot fuse an empty template (mu has shape {tuple(mu.shape)})")
    if temperature <= 0:
        raise ValueError(f"fusion temperature must be > 0, got {temperature}")
    sigma_sq = sigma_sq.reshape(mu.shape[0], -1)
    logits = torch.log(1.0 / torch.clamp(sigma_sq, min=VAR_FLOOR / 2) + 1e-6) / temperature
    # softmax over the set == exp(logits)/Σexp(logits), without overflow for tiny σ² or small T
    weights = torch.softmax(logits, dim=0)
    mu_t = (weights * mu).sum(dim=0)
    if normalize:
        mu_t = mu_t / (mu_t.norm() + 1e-8)
    return mu_t, (weights * sigma_sq).sum(dim=0)
