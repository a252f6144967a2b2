"""Centre term of the video model (seed 003), as an add-on to any angular-margin head.

``L = L_margin + λ_c·s·mean(1 − cos θ_y)``: since W_y is the centre of class y on the hypersphere,
``1 − cos θ_y`` measures how far an embedding is from its centre, and the margin head's scale ``s`` is
applied to it too. Rows labelled −1 (class on another PartialFC worker) carry no centre term.
"""

from __future__ import annotations

import torch
from torch import nn

from facepipe.models.heads.margins import MarginHead, flat_labels

__all__ = ["centre_term", "CentreTerm"]


def centre_term(cos: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(Σ (1 − cos θ_y), number of rows with a target)`` over rows whose label is not −1."""
    labels = flat_labels(labels)
    valid = torch.nonzero(labels != -1).reshape(-1)
    target = cos[valid, labels[valid]]
    return (1.0 - target).sum(), int(valid.numel())


class CentreTerm(MarginHead):
    """Wraps a margin head; logits are the inner head's, the loss adds ``λ_c·s·mean(1 − cos θ_y)``."""

    def __init__(self, inner: MarginHead, weight: float = 0.01):
        nn.Module.__init__(self)
        self.inner = inner
        self.centre_weight = float(weight)
        self.s = inner.s
        self.needs_norms = inner.needs_norms
        self.loss_kind = inner.loss_kind

    @property
    def weight(self):  # the class centres live in the wrapped head
        return self.inner.weight

    def sync_stats(self, group=None) -> None:
        self.inner.sync_stats(group)

    def cosine(self, embeddings):
        return self.inner.cosine(embeddings)

    def margin(self, cos, labels, norms=None):
        return self.inner.margin(cos, labels, norms)

    def centre_loss(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, count = centre_term(cos, labels)
        return self.centre_weight * self.s * total / max(count, 1)

    def logits_loss(self, logits, labels):
        return self.inner.logits_loss(logits, labels)

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, norms = self.cosine(embeddings)
        logits = self.margin(cos, labels, norms)
        return self.inner.logits_loss(logits, labels) + self.centre_loss(cos, labels)
