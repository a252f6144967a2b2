"""DUL-rgs: Data Uncertainty Learning, regression variant (Chang et al., CVPR 2020).

On the frozen backbone's final conv map a head predicts, per embedding dimension, a mean μ̂ and a
log-variance log σ². Training regresses every sample onto the centre w_c of its class (the margin
head's weight row saved with the backbone, L2-normalised like μ̂) under a diagonal Gaussian; the loss
is the negative log-likelihood without its constant:

    L = mean_i  ½ Σ_l [ (w_{c_i,l} − μ̂_{i,l})² / σ²_{i,l} + log σ²_{i,l} ].

A sample whose features cannot be brought close to its class centre (blur, occlusion, a bad crop) is
explained by a large σ² instead of dragging the regression: that σ² is the data uncertainty.

The head's output is [μ̂ | log σ²] (N, 2D); ``to_uncertainty`` keeps σ² (N, D). As for every method
here, the identity embedding μ used for scoring is the backbone's own (unit) embedding: μ̂ only
exists to give σ² a regression target.

Scoring and fusion: the paper scores DUL-rgs by the cosine of the means and uses σ² only for
quality. Here the uncertainty-aware score is PFE's mutual likelihood score (MLS) with fusion by
precision weighting, also PFE's. The choice follows from the model: both methods describe a face as
a diagonal Gaussian around μ with per-dimension σ², and MLS is the log-likelihood that two such
Gaussians share their mean. It down-weights exactly the dimensions the loss above declared noisy,
and reusing PFE's tested functions keeps one implementation of the score (the cosine score is still
reported beside it by every evaluation).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from facepipe.uncertainty.common import LogVarianceHead
from facepipe.uncertainty.pfe import fuse, pair_score, score_matrix, uncertainty_scalar

NAME = "dul"

# PFE's score, fusion and scalar are DUL's too (see above); listed so the re-exports read as intended
__all__ = [
    "NAME",
    "DULHead",
    "build_head",
    "fuse",
    "loss",
    "pair_score",
    "score_matrix",
    "to_uncertainty",
    "uncertainty_scalar",
]


class DULHead(nn.Module):
    """Flattened conv map → [μ̂ (D) | log σ² (D)]: a linear mean branch beside PFE's log-variance head."""

    def __init__(self, in_features: int, embedding_size: int, **kw) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.mean = nn.Linear(in_features, embedding_size)
        kw.setdefault("beta_init", -3.0)  # start near σ² ≈ 0.05: the squared distances of unit vectors
        self.log_var = LogVarianceHead(in_features, embedding_size, **kw)

    def forward(self, features: Tensor) -> Tensor:
        mean = self.mean(torch.flatten(features, 1))
        return torch.cat([mean, self.log_var(features)], dim=1)


def build_head(in_features: int, embedding_size: int, **kw) -> DULHead:
    return DULHead(in_features, embedding_size, **kw)


def _split(head_output: Tensor) -> tuple[Tensor, Tensor]:
    d = head_output.shape[1] // 2
    return head_output[:, :d], head_output[:, d:]


def to_uncertainty(head_output: Tensor) -> Tensor:
    """Head output [μ̂ | log σ²] → σ² (N, D)."""
    return torch.exp(_split(head_output)[1])


def loss(
    mu: Tensor, head_output: Tensor, labels: Tensor, *, class_weights: Tensor | None = None, **_: object
) -> tuple[Tensor, dict[str, Tensor]]:
    """Gaussian NLL of the class centres w_c under N(μ̂, diag σ²), averaged over the batch.

    ``mu`` (the backbone's embedding) is not used: the regression target is the class centre.
    Raises ValueError without ``class_weights`` (C, D), the backbone's margin-head weights.
    """
    if class_weights is None:
        raise ValueError("DUL regresses onto class centres: pass the backbone's class_weights")
    mean, log_var = _split(head_output)
    centres = F.normalize(class_weights[labels.reshape(-1).long()].to(mean.dtype), dim=1)
    mean = F.normalize(mean, dim=1)
    sq = (centres - mean) ** 2
    total = 0.5 * (sq * torch.exp(-log_var) + log_var).sum(dim=1).mean()
    return total, {
        "nll": total.detach(),
        "centre_distance": sq.sum(dim=1).mean().detach(),
        "sigma_sq_mean": torch.exp(log_var).mean().detach(),
    }
