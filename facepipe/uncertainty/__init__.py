"""Uncertainty heads trained on a frozen backbone: PFE, ProbFace and SCF (one module each).

Use ``get_method(name)`` for a method's functions (loss, pair score, fusion, …) and
``build_uncertainty_head`` for its head; ``bessel`` holds the stable log I_v(κ) that SCF needs.
"""

from facepipe.uncertainty import bessel, pfe, probface, scf
from facepipe.uncertainty.registry import (
    METHODS,
    EmbeddingWithUncertainty,
    UncertaintyMethod,
    build_uncertainty_head,
    get_method,
    score_pairs,
)

__all__ = [
    "METHODS",
    "EmbeddingWithUncertainty",
    "UncertaintyMethod",
    "bessel",
    "build_uncertainty_head",
    "get_method",
    "pfe",
    "probface",
    "scf",
    "score_pairs",
]
