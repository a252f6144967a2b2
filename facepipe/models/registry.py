"""Backbones and margin heads by name (the names used in ``params.yaml``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from facepipe.errors import FacepipeError
from facepipe.models.backbones import iresnet, mobilefacenet, sfnet
from facepipe.models.heads import (
    AdaFace,
    ArcFace,
    ASoftmax,
    CentreTerm,
    CombinedMargin,
    CosFace,
    CurricularFace,
    InsightFaceCombinedMargin,
    MarginHead,
    NormFace,
    OpenSphereFace,
    SphereFace2,
)

__all__ = ["BACKBONES", "MARGIN_HEADS", "build_backbone", "build_margin_head"]

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{
        name: partial(iresnet, name)
        for name in ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200")
    },
    "iresnet_tiny": partial(iresnet, "iresnet_tiny"),
    "iresnet_tiny_s2": partial(iresnet, "iresnet_tiny_s2"),
    "sphereface20": partial(sfnet, "sphereface20"),
    "sphereface36": partial(sfnet, "sphereface36"),
    "sphereface64": partial(sfnet, "sphereface64"),
    # ProbFace's "ResFace64" is SphereFace-64 on 96x96 crops.
    "resface64": partial(sfnet, "sphereface64", input_size=(96, 96)),
    "sphereface_tiny": partial(sfnet, "sphereface_tiny"),
    "mobilefacenet": partial(mobilefacenet, "mobilefacenet"),
    "mobilefacenet_large": partial(mobilefacenet, "mobilefacenet_large"),
    "mobilefacenet_tiny": partial(mobilefacenet, "mobilefacenet_tiny"),
}

# Each constructor's s / m defaults are its paper's (ArcFace s=64 m=0.5, CosFace s=64 m=0.4, A-Softmax
# m=4, AdaFace s=64 m=0.4 h=0.333, CurricularFace s=64 m=0.5): `train_backbone.margin` leaves a key unset
# (None) to use them, so switching heads never carries another head's margin.
MARGIN_HEADS: dict[str, Callable[..., MarginHead]] = {
    "softmax": NormFace,
    "normface": NormFace,
    "cosface": CosFace,
    "arcface": ArcFace,  # legacy (2022) form by default; form="head" for InsightFace's current code
    "arcface_head": partial(ArcFace, form="head"),
    "arcface_legacy": partial(ArcFace, form="legacy"),
    "combined": CombinedMargin,
    "insightface_combined": InsightFaceCombinedMargin,
    "sphereface": ASoftmax,  # original A-Softmax, m=4, Caffe λ schedule
    "a_softmax": ASoftmax,
    "opensphere_sphereface": OpenSphereFace,
    "sphereface2": SphereFace2,
    "adaface": AdaFace,
    "curricularface": CurricularFace,
}


def _unknown(kind: str, name: str, known) -> FacepipeError:
    return FacepipeError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


def build_backbone(name: str, **kw) -> nn.Module:
    """A backbone by registry name; ``kw`` go to its constructor (embedding_size, input_size, width...)."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise _unknown("backbone", name, BACKBONES) from None
    return factory(**kw)


def build_margin_head(name: str, centre_weight: float = 0.0, **kw) -> MarginHead:
    """A margin head by registry name; ``centre_weight > 0`` adds the seed-003 centre term.

    Give ``embedding_size`` and ``num_classes`` for a head that owns the class centres, or neither for a
    margin-only head (PartialFC owns the centres).
    """
    try:
        factory = MARGIN_HEADS[name]
    except KeyError:
        raise _unknown("margin head", name, MARGIN_HEADS) from None
    head = factory(**kw)
    if centre_weight > 0:
        head = CentreTerm(head, centre_weight)
    return head
