"""Margin heads (the deterministic stage): each maps normalised embeddings (or cos θ) + labels to logits."""

from facepipe.models.heads.adaface import AdaFace
from facepipe.models.heads.centre import CentreTerm, centre_term
from facepipe.models.heads.curricularface import CurricularFace
from facepipe.models.heads.margins import (
    ArcFace,
    CombinedMargin,
    CosFace,
    InsightFaceCombinedMargin,
    MarginHead,
    NormFace,
    arcface_logits,
    combined_margin_logits,
    cosface_logits,
    insightface_combined_logits,
    normface_logits,
)
from facepipe.models.heads.sphereface import ASoftmax, OpenSphereFace, SphereFace2

__all__ = [
    "AdaFace",
    "ASoftmax",
    "ArcFace",
    "CentreTerm",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "InsightFaceCombinedMargin",
    "MarginHead",
    "NormFace",
    "OpenSphereFace",
    "SphereFace2",
    "arcface_logits",
    "centre_term",
    "combined_margin_logits",
    "cosface_logits",
    "insightface_combined_logits",
    "normface_logits",
]
