"""Additive / angular margin heads: NormFace, CosFace, ArcFace, combined margins.

Every head works in two layers:

* a functional form over ``cos θ`` (shape ``(B, C)``) and labels, used by the golden tests and by
  PartialFC, where only a shard of the class centres lives on each worker;
* a module (:class:`MarginHead`) that optionally owns the class-centre matrix ``weight`` (C, D) and maps
  embeddings + labels to logits.

Label conventions follow InsightFace: labels may be shaped ``(B,)`` or ``(B, 1)``; rows labelled ``-1``
(their class lives on another PartialFC worker) are only scaled by ``s``.

Functions of ``θ`` use :func:`safe_acos` / :func:`safe_sin_from_cos`: the forward value is exact even at
``cos θ = ±1`` while the gradient stays finite there.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "safe_acos",
    "safe_sin_from_cos",
    "flat_labels",
    "target_mask",
    "normface_logits",
    "cosface_logits",
    "arcface_logits",
    "combined_margin_logits",
    "insightface_combined_logits",
    "MarginHead",
    "NormFace",
    "CosFace",
    "ArcFace",
    "CombinedMargin",
    "InsightFaceCombinedMargin",
]

# Distance from ±1 at which the surrogate gradient of acos / sqrt(1-x²) is evaluated.
_GRAD_EPS = 1e-6


def safe_acos(x: Tensor, eps: float = _GRAD_EPS) -> Tensor:
    """``acos`` of ``x`` clamped to [-1, 1], exact in value, with a finite gradient at ±1.

    The gradient is that of ``acos`` at ``x`` pulled ``eps`` inside the interval.
    """
    exact = torch.acos(x.clamp(-1.0, 1.0))
    inner = torch.acos(x.clamp(-1.0 + eps, 1.0 - eps))
    return inner + (exact - inner).detach()


def safe_sin_from_cos(x: Tensor, eps: float = _GRAD_EPS) -> Tensor:
    """``sqrt(1 - x²)`` (= sin θ for θ in [0, π]), exact in value, finite gradient at ``x = ±1``."""
    exact = torch.sqrt((1.0 - x * x).clamp(min=0.0))
    xc = x.clamp(-1.0 + eps, 1.0 - eps)
    inner = torch.sqrt(1.0 - xc * xc)
    return inner + (exact - inner).detach()


def flat_labels(labels: Tensor) -> Tensor:
    """Labels as a 1-D int64 tensor (accepts the ``(N, 1)`` layout PartialFC uses)."""
    return labels.reshape(-1).long()


def target_mask(cos: Tensor, labels: Tensor) -> Tensor:
    """Boolean ``(B, C)`` mask of the target entries; rows labelled -1 have none."""
    labels = flat_labels(labels)
    if labels.shape[0] != cos.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {cos.shape[0]} rows of logits")
    valid = labels != -1
    if bool(((labels[valid] < 0) | (labels[valid] >= cos.shape[1])).any()):
        raise ValueError(f"labels must be -1 or in [0, {cos.shape[1]}), got {labels.tolist()}")
    mask = torch.zeros_like(cos, dtype=torch.bool)
    rows = torch.nonzero(valid).reshape(-1)
    mask[rows, labels[rows]] = True
    return mask


def _replace_target(cos: Tensor, mask: Tensor, new_target: Tensor) -> Tensor:
    """``cos`` with its target entries replaced by the same-shaped ``new_target`` (out of place)."""
    return torch.where(mask, new_target, cos)


def normface_logits(cos: Tensor, labels: Tensor | None = None, s: float = 64.0) -> Tensor:
    """NormFace / normalised softmax: ``s·cos θ`` everywhere."""
    return cos * s


def cosface_logits(cos: Tensor, labels: Tensor, s: float = 64.0, m: float = 0.4) -> Tensor:
    """CosFace: target ``s·(cos θ_y − m)``, other entries ``s·cos θ``."""
    mask = target_mask(cos, labels)
    return _replace_target(cos, mask, cos - m) * s


def _arc_target(cos: Tensor, m: float, form: str, easy_margin: bool) -> Tensor:
    """``cos(θ + m)`` for every entry, with the chosen behaviour when ``θ + m > π``."""
    cos_m, sin_m = math.cos(m), math.sin(m)
    shifted = cos * cos_m - safe_sin_from_cos(cos) * sin_m
    if form == "head":
        # InsightFace HEAD: plain cos(θ+m), non-monotonic beyond θ = π − m.
        return shifted
    if form != "legacy":
        raise ValueError(f"ArcFace form must be 'head' or 'legacy', got {form!r}")
    if easy_margin:
        return torch.where(cos > 0, shifted, cos)
    threshold = math.cos(math.pi - m)
    return torch.where(cos > threshold, shifted, cos - math.sin(math.pi - m) * m)


def arcface_logits(
    cos: Tensor,
    labels: Tensor,
    s: float = 64.0,
    m: float = 0.5,
    form: str = "legacy",
    easy_margin: bool = False,
) -> Tensor:
    """ArcFace: target ``s·cos(θ_y + m)``.

    ``form="head"`` is InsightFace's current code (no handling of ``θ + m > π``: the target is
    ``cos(θ+m)`` even there); ``form="legacy"`` is the 2022 code: beyond ``θ > π − m`` the target is
    ``cos θ − sin(π − m)·m`` (monotonic), or with ``easy_margin`` the margin applies only where cos θ > 0.
    Unlike the reference, the gradient is the true derivative of the target (the HEAD reference
    applies its margin under ``no_grad``).
    """
    if easy_margin and form == "head":
        raise ValueError("easy_margin exists only in the legacy ArcFace form")
    mask = target_mask(cos, labels)
    return _replace_target(cos, mask, _arc_target(cos, m, form, easy_margin)) * s


def combined_margin_logits(
    cos: Tensor, labels: Tensor, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0
) -> Tensor:
    """True combined margin (InsightFace MXNet): target ``s·(cos(m1·θ_y + m2) − m3)``, no fallback."""
    mask = target_mask(cos, labels)
    target = torch.cos(m1 * safe_acos(cos) + m2) - m3
    return _replace_target(cos, mask, target) * s


def _interclass_filter(cos: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Zero non-target entries above ``threshold`` (likely label noise), as InsightFace's filter does.

    Rows without a local target (label -1) have every entry above the threshold zeroed, like the reference.
    """
    dirty = (cos > threshold) & ~mask
    return cos * (~dirty).to(cos.dtype)


def insightface_combined_logits(
    cos: Tensor,
    labels: Tensor,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    interclass_filtering_threshold: float = 0.0,
    form: str = "head",
) -> Tensor:
    """InsightFace arcface_torch ``CombinedMarginLoss`` behaviour (compatibility mode).

    Quirks kept on purpose: with ``m3 > 0`` it is CosFace with margin ``m3`` and **m2 and m1 are ignored**;
    with ``m1 == 1, m3 == 0`` it is ArcFace with margin ``m2`` (``form`` picks HEAD or legacy); any other
    setting is rejected (the reference hits a bare ``raise``). Use :func:`combined_margin_logits` for the
    real ``cos(m1·θ + m2) − m3``.
    """
    mask = target_mask(cos, labels)
    if interclass_filtering_threshold > 0:
        cos = _interclass_filter(cos, mask, interclass_filtering_threshold)
    if m1 == 1.0 and m3 == 0.0:
        target = _arc_target(cos, m2, form, easy_margin=False)
    elif m3 > 0:
        target = cos - m3
    else:
        raise ValueError(
            f"InsightFace CombinedMarginLoss supports only m1=1,m3=0 or m3>0 (got m1={m1}, m3={m3}); "
            "use the 'combined' head for the general cos(m1·θ+m2)−m3"
        )
    return _replace_target(cos, mask, target) * s


class MarginHead(nn.Module):
    """Base class: optional class-centre matrix, cosine computation, margin over cos θ, loss.

    With ``embedding_size`` and ``num_classes`` the head owns ``weight`` (C, D) and ``forward`` takes raw
    embeddings. Without them it is margin-only (PartialFC owns the centres and calls :meth:`margin`).
    """

    #: whether :meth:`margin` needs the embedding norms (AdaFace, A-Softmax)
    needs_norms: bool = False
    #: "ce" (softmax cross-entropy over the logits) or "bce" (SphereFace2's one-vs-all)
    loss_kind: str = "ce"

    def __init__(self, embedding_size: int | None = None, num_classes: int | None = None, s: float = 64.0):
        super().__init__()
        self.s = float(s)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        if (embedding_size is None) != (num_classes is None):
            raise ValueError("give both embedding_size and num_classes, or neither (margin-only head)")
        # Set by PartialFC: batch statistics (e.g. CurricularFace's t) are then summed over the
        # workers, each of which sees the targets of its own class shard only.
        self.stats_sync = False
        self.stats_group = None
        if embedding_size is not None:
            self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
            self.reset_parameters()
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.normal_(self.weight, 0.0, 0.01)

    def sync_stats(self, group=None) -> None:
        """Sum batch statistics over the workers of ``group`` (every worker must then call ``margin``)."""
        self.stats_sync, self.stats_group = True, group

    def _sum_over_workers(self, tensor: Tensor) -> Tensor:
        if self.stats_sync and dist.is_available() and dist.is_initialized():
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.stats_group)
        return tensor

    def cosine(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos θ (B, C), embedding norms (B, 1))`` against the normalised class centres."""
        if self.weight is None:
            raise RuntimeError(f"{type(self).__name__} was built margin-only; call margin(cos, labels)")
        norms = embeddings.norm(p=2, dim=1, keepdim=True)
        cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))
        return cos.clamp(-1.0, 1.0), norms

    def margin(
        self, cos: Tensor, labels: Tensor, norms: Tensor | None = None
    ) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cos, norms = self.cosine(embeddings)
        return self.margin(cos, labels, norms)

    def logits_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The head's loss on its own logits (softmax CE; rows labelled -1 are ignored)."""
        return F.cross_entropy(logits, flat_labels(labels), ignore_index=-1)

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.logits_loss(self(embeddings, labels), labels)


class NormFace(MarginHead):
    """Normalised softmax ``s·cos θ`` (no margin)."""

    def margin(self, cos, labels, norms=None):
        return normface_logits(cos, labels, self.s)


class CosFace(MarginHead):
    def __init__(self, embedding_size=None, num_classes=None, s: float = 64.0, m: float = 0.4):
        super().__init__(embedding_size, num_classes, s)
        self.m = float(m)

    def margin(self, cos, labels, norms=None):
        return cosface_logits(cos, labels, self.s, self.m)


class ArcFace(MarginHead):
    """ArcFace; ``form`` is ``"legacy"`` (default: monotonic, θ+m>π fallback) or ``"head"``."""

    def __init__(
        self, embedding_size=None, num_classes=None, s: float = 64.0, m: float = 0.5,
        form: str = "legacy", easy_margin: bool = False,
    ):  # fmt: skip
        super().__init__(embedding_size, num_classes, s)
        if form not in ("head", "legacy"):
            raise ValueError(f"ArcFace form must be 'head' or 'legacy', got {form!r}")
        if easy_margin and form == "head":
            raise ValueError("easy_margin exists only in the legacy ArcFace form")
        self.m, self.form, self.easy_margin = float(m), form, bool(easy_margin)

    def margin(self, cos, labels, norms=None):
        return arcface_logits(cos, labels, self.s, self.m, self.form, self.easy_margin)


class CombinedMargin(MarginHead):
    """The true combined margin ``cos(m1·θ_y + m2) − m3``."""

    def __init__(self, embedding_size=None, num_classes=None, s=64.0, m1=1.0, m2=0.5, m3=0.0):
        super().__init__(embedding_size, num_classes, s)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def margin(self, cos, labels, norms=None):
        return combined_margin_logits(cos, labels, self.s, self.m1, self.m2, self.m3)


class InsightFaceCombinedMargin(MarginHead):
    """InsightFace arcface_torch ``CombinedMarginLoss`` compatibility (see the functional form)."""

    def __init__(
        self, embedding_size=None, num_classes=None, s=64.0, m1=1.0, m2=0.5, m3=0.0,
        interclass_filtering_threshold: float = 0.0, form: str = "head",
    ):  # fmt: skip
        super().__init__(embedding_size, num_classes, s)
        if not ((m1 == 1.0 and m3 == 0.0) or m3 > 0):
            raise ValueError(
                f"InsightFace CombinedMarginLoss supports only m1=1,m3=0 or m3>0 (got m1={m1}, m3={m3})"
            )
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.form = form

    def margin(self, cos, labels, norms=None):
        return insightface_combined_logits(
            cos, labels, self.s, self.m1, self.m2, self.m3, self.interclass_filtering_threshold, self.form
        )
