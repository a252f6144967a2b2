"""One entry per uncertainty method, so training and evaluation call the same functions by name.

Every method provides (see ``UncertaintyMethod``):
- ``build_head(in_features_or_channels, embedding_size, **kw)``: the head, whose forward returns log u;
- ``to_uncertainty(head_output) -> u``: σ² (PFE (N, D), ProbFace (N, 1)) or κ (SCF (N, 1));
- ``loss(mu, head_output, labels, class_weights=None, **kw) -> (total, terms)``;
- ``pair_score(mu_a, u_a, mu_b, u_b) -> (N,)`` for row-aligned pairs, higher = more alike;
- ``score_matrix(mu_a, u_a, mu_b, u_b) -> (Na, Nb)``;
- ``fuse(mu (n, D), u, **kw) -> (mu_t (D,), u_t)``: template fusion (empty templates raise ValueError);
- ``uncertainty_scalar(u) -> (N,)``: larger = less certain (mean σ², σ², 1/κ).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from facepipe.uncertainty import pfe, probface, scf


@dataclass(frozen=True)
class UncertaintyMethod:
    name: str
    uncertainty_name: str  # what u is: "sigma_sq" or "kappa"
    head_input: str  # "flattened" (the conv map flattened into an FC) or "conv_map"
    build_head: Callable[..., nn.Module]
    to_uncertainty: Callable[[Tensor], Tensor]
    loss: Callable[..., tuple[Tensor, dict[str, Tensor]]]
    pair_score: Callable[..., Tensor]
    score_matrix: Callable[..., Tensor]
    fuse: Callable[..., tuple[Tensor, Tensor]]
    uncertainty_scalar: Callable[[Tensor], Tensor]


def _from_module(module: ModuleType, uncertainty_name: str, head_input: str) -> UncertaintyMethod:
    return UncertaintyMethod(
        name=module.NAME,
        uncertainty_name=uncertainty_name,
        head_input=head_input,
        build_head=module.build_head,
        to_uncertainty=module.to_uncertainty,
        loss=module.loss,
        pair_score=module.pair_score,
        score_matrix=module.score_matrix,
        fuse=module.fuse,
        uncertainty_scalar=module.uncertainty_scalar,
    )


METHODS: dict[str, UncertaintyMethod] = {
    "pfe": _from_module(pfe, "sigma_sq", "flattened"),
    "probface": _from_module(probface, "sigma_sq", "flattened"),
    "scf": _from_module(scf, "kappa", "conv_map"),
}


def get_method(name: str) -> UncertaintyMethod:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown uncertainty method {name!r}; known: {sorted(METHODS)}") from None


def build_uncertainty_head(
    method: str,
    in_channels: int,
    embedding_size: int,
    *,
    feature_hw: tuple[int, int] | None = (7, 7),
    **kw,
) -> nn.Module:
    """The head of ``method`` for a backbone whose final conv map is (in_channels, *feature_hw).

    PFE and ProbFace flatten the map into an FC (in_features = in_channels·H·W; pass ``feature_hw=None``
    for pre-embedding vectors of size in_channels). SCF convolves the map and pools, so H·W is free.
    """
    spec = get_method(method)
    if spec.head_input == "flattened":
        h, w = feature_hw if feature_hw is not None else (1, 1)
        return spec.build_head(in_channels * h * w, embedding_size, **kw)
    return spec.build_head(in_channels, embedding_size, **kw)


def score_pairs(
    method: str,
    mu_a: object,
    u_a: object,
    mu_b: object,
    u_b: object,
    *,
    chunk: int = 65536,
) -> np.ndarray:
    """``pair_score`` over many row-aligned pairs: numpy or torch in, float64 numpy out, ``chunk`` at a time.

    Memory stays O(chunk·D) whatever the number of pairs (IJB-C has 15.6M).
    """
    spec = get_method(method)
    n = len(mu_a)
    out = np.empty(n, dtype=np.float64)
    with torch.no_grad():
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            parts = [torch.as_tensor(np.asarray(x[start:stop])) for x in (mu_a, u_a, mu_b, u_b)]
            out[start:stop] = spec.pair_score(*parts).to(torch.float64).cpu().numpy()
    return out


class EmbeddingWithUncertainty(nn.Module):
    """A backbone and an uncertainty head as one module: image batch → (embedding, u).

    ``backbone.forward_features(x)`` must return (embedding, final conv map). The embedding is returned as
    the backbone gives it (not normalised: its norm is used by some protocols); u is σ² or κ.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, method: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.method = get_method(method).name

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        embedding, feature_map = self.backbone.forward_features(images)
        return embedding, torch.exp(self.head(feature_map))
