"""Uncertainty heads trained on a frozen backbone: PFE, ProbFace, SCF and DUL (one module each).

``registry`` knows every method (``get_method(name)`` for its functions and facts, ``register`` to add
one); ``build_uncertainty_head`` builds a head; ``common`` holds what methods share; ``head_io`` saves
and loads trained heads; ``bessel`` holds the stable log I_v(κ) that SCF needs.
"""

from facepipe.uncertainty import bessel, dul, pfe, probface, scf
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
    "dul",
    "get_method",
    "pfe",
    "probface",
    "scf",
    "score_pairs",
]
