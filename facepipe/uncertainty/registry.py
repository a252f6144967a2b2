"""The one place that knows the uncertainty methods: name → everything training and evaluation need.

A method is a module (or any namespace) with ``NAME`` and these functions:
- ``build_head(in_features_or_channels, embedding_size, **kw)``: the head, whose forward returns log u;
- ``to_uncertainty(head_output) -> u``: the head's uncertainty (σ² for PFE / ProbFace, κ for SCF);
- ``loss(mu, head_output, labels, class_weights=None, **kw) -> (total, terms)``;
- ``pair_score(mu_a, u_a, mu_b, u_b) -> (N,)`` for row-aligned pairs, higher = more alike;
- ``score_matrix(mu_a, u_a, mu_b, u_b) -> (Na, Nb)``;
- ``fuse(mu (n, D), u, **kw) -> (mu_t (D,), u_t)``: template fusion (empty templates raise ValueError);
- ``uncertainty_scalar(u) -> (N,)``: larger = less certain (mean σ², σ², 1/κ);
- optionally ``score_from_cos(cos, u_a, u_b) -> (N,)`` when the score depends on μ only through cos θ
  and on u through one number per image: evaluation then scores template × template with one GEMM.

``register(module, ...)`` adds one with its facts (batching, class centres, uncertainty kind and width,
registered model name, score name); the CLI choices, the config check, tracking's model names, the
head stage and evaluation all read them from here. A new method is one file plus one ``register`` line.

Uncertainty *kinds* (what evaluation stores per image, larger = less certain): ``sigma_sq`` stores u as
it is; ``inv_kappa`` stores 1/u (u = κ). ``KINDS`` maps each to the name of u and the conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from facepipe.uncertainty import dul, pfe, probface, scf

# stored kind -> (name of the head's u, u -> stored value; the conversion is its own inverse)
KINDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "sigma_sq": ("sigma_sq", lambda u: u),
    "inv_kappa": ("kappa", lambda u: 1.0 / u),
}


@dataclass(frozen=True)
class UncertaintyMethod:
    name: str
    head_input: str  # "flattened" (the conv map flattened into an FC) or "conv_map"
    build_head: Callable[..., nn.Module]
    to_uncertainty: Callable[[Tensor], Tensor]
    loss: Callable[..., tuple[Tensor, dict[str, Tensor]]]
    pair_score: Callable[..., Tensor]
    score_matrix: Callable[..., Tensor]
    fuse: Callable[..., tuple[Tensor, Tensor]]
    uncertainty_scalar: Callable[[Tensor], Tensor]
    batching: Literal["pk", "plain"]  # P classes × K images (pair losses) or plain shuffled batches
    needs_class_centres: bool  # the loss reads the backbone's margin-head weights (`class_weights`)
    uncertainty_kind: str  # a key of KINDS: what evaluation stores per image
    per_dimension: bool  # u has D columns (one per embedding dimension), else one
    model_name: str  # the MLflow registered model
    score_name: str  # the metric key of the uncertainty-aware score in reports
    score_from_cos: Callable[..., Tensor] | None = None

    @property
    def uncertainty_name(self) -> str:
        """What the head's u is: "sigma_sq" or "kappa" (the exported model's second output)."""
        return KINDS[self.uncertainty_kind][0]

    def uncertainty_size(self, embedding_size: int) -> int:
        """Columns of u for embeddings of `embedding_size` dimensions."""
        return embedding_size if self.per_dimension else 1

    def to_stored(self, u: Any) -> Any:
        """u (σ² or κ) → the stored per-image uncertainty (σ² or 1/κ); also the inverse."""
        return KINDS[self.uncertainty_kind][1](u)


METHODS: dict[str, UncertaintyMethod] = {}


def register(
    module: Any,
    *,
    head_input: str,
    batching: Literal["pk", "plain"],
    kind: str,
    per_dimension: bool = False,
    needs_class_centres: bool = False,
    score_name: str | None = None,
    model_name: str | None = None,
) -> UncertaintyMethod:
    """Add (or replace) the method defined by `module`'s ``NAME`` and functions; returns its entry."""
    if kind not in KINDS:
        raise ValueError(f"unknown uncertainty kind {kind!r}; known: {sorted(KINDS)}")
    if batching not in ("pk", "plain"):
        raise ValueError(f"batching must be 'pk' or 'plain', got {batching!r}")
    name = module.NAME.lower()
    spec = UncertaintyMethod(
        name=name,
        head_input=head_input,
        build_head=module.build_head,
        to_uncertainty=module.to_uncertainty,
        loss=module.loss,
        pair_score=module.pair_score,
        score_matrix=module.score_matrix,
        fuse=module.fuse,
        uncertainty_scalar=module.uncertainty_scalar,
        batching=batching,
        needs_class_centres=needs_class_centres,
        uncertainty_kind=kind,
        per_dimension=per_dimension,
        model_name=model_name or f"facepipe-{name}",
        score_name=score_name or name,
        score_from_cos=getattr(module, "score_from_cos", None),
    )
    METHODS[name] = spec
    return spec


register(
    pfe, head_input="flattened", batching="pk", kind="sigma_sq", score_name="mls_pfe", per_dimension=True
)
register(probface, head_input="flattened", batching="pk", kind="sigma_sq", score_name="mls_probface")
register(scf, head_input="conv_map", batching="plain", kind="inv_kappa", needs_class_centres=True)
register(
    dul,
    head_input="flattened",
    batching="plain",
    kind="sigma_sq",
    per_dimension=True,
    needs_class_centres=True,
)


def method_names() -> list[str]:
    """Every registered method, in registration order (CLI choices, config check, flows)."""
    return list(METHODS)


def get_method(name: str) -> UncertaintyMethod:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown uncertainty method {name!r}; known: {sorted(METHODS)}") from None


def method_for_stored(kind: str, columns: int, embedding_size: int) -> UncertaintyMethod:
    """The method whose stored uncertainty has this kind and width (for features files without a method)."""
    for spec in METHODS.values():
        if spec.uncertainty_kind == kind and spec.uncertainty_size(embedding_size) == columns:
            return spec
    raise ValueError(
        f"no uncertainty method stores {kind} with {columns} columns for {embedding_size}-d embeddings"
    )


def resolve(method: str | UncertaintyMethod) -> UncertaintyMethod:
    """A registry entry from its name, or the entry itself (as Ray workers receive it)."""
    return method if isinstance(method, UncertaintyMethod) else get_method(method)


def build_uncertainty_head(
    method: str | UncertaintyMethod,
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
    spec = resolve(method)
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
        return embedding, get_method(self.method).to_uncertainty(self.head(feature_map))
