"""SCF: Sphere Confidence Face (Li et al., CVPR 2021).

Each face is a von Mises–Fisher distribution on the unit sphere in d dimensions: mean direction μ (the
frozen backbone's normalised embedding) and concentration κ predicted by a head on the final conv map.
The head is trained by the KL divergence between a Dirac at the class centre and the vMF, which up to
constants is the negative vMF log-likelihood of the class centre:

    L = −κ·(μ·w_c)/r − (d/2−1)·log κ + log I_{d/2−1}(κ) + (d/2)·log 2π + d·log r.

Two modes: ``"stable"`` (training: exact log I_v through ``bessel.log_iv_minus_vlog``, float64 inside, finite
for κ → 0 and κ = 1e5) and ``"reference"`` (reproduces the authors' ``log(1e-6 + ive)`` with ive rounded to
float32, used only to check against their numbers: for κ below ~3500 the Bessel term is lost in it).

Pair similarity (Eqn 13) and template aggregation (Eqn 14) come from the paper; the authors' code has
neither. Uncertainty ``u`` for this method is κ of shape (N, 1); the head returns log κ.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from facepipe.uncertainty.bessel import log_iv, log_iv_minus_vlog
from facepipe.uncertainty.common import as_tensors, rowwise_dot

NAME = "scf"
DEFAULT_RADIUS = 64.0
_FLOOR = math.log(1e-6)  # log κ = log(1e-6 + exp(raw)), as the authors' head: κ > 0 always


class SCFHead(nn.Module):
    """Conv map (N, C, H, W) → [conv3x3 → BN → PReLU] × n_conv → global average pool → MLP → log κ (N, 1).

    The MLP halves and quarters the width (C → C/2 → C/4 → 1) like the authors' head. Pre-embedding
    features (N, C) are accepted as a 1×1 map. ``log_kappa_init`` sets the last bias so training starts
    at a chosen concentration (κ ≈ 100 by default, where the vMF loss has a usable gradient for d = 512).
    """

    def __init__(
        self,
        in_channels: int,
        embedding_size: int = 512,
        *,
        n_conv: int = 1,
        log_kappa_init: float = math.log(100.0),
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.embedding_size = embedding_size
        blocks: list[nn.Module] = []
        for _ in range(n_conv):
            blocks += [
                nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.PReLU(in_channels),
            ]
        self.convs = nn.Sequential(*blocks)
        hidden = max(4, in_channels // 2)
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, max(2, hidden // 2)),
            nn.ReLU(inplace=True),
            nn.Linear(max(2, hidden // 2), 1),
        )
        nn.init.constant_(self.mlp[-1].bias, float(log_kappa_init))

    def forward(self, features: Tensor) -> Tensor:
        x = features[:, :, None, None] if features.ndim == 2 else features
        if x.shape[1] != self.in_channels:
            raise ValueError(f"head expects {self.in_channels} channels, got {x.shape[1]}")
        x = self.convs(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        raw = self.mlp(x)
        return _FLOOR + F.softplus(raw - _FLOOR)


def build_head(in_channels: int, embedding_size: int, **kw) -> SCFHead:
    return SCFHead(in_channels, embedding_size, **kw)


def to_uncertainty(head_output: Tensor) -> Tensor:
    """Head output (log κ) → κ (N, 1). Note κ is a *confidence*: larger = more certain."""
    return torch.exp(head_output)


def uncertainty_scalar(kappa: Tensor) -> Tensor:
    """Per-image scalar uncertainty 1/κ (larger = less certain, like σ²)."""
    return 1.0 / kappa.reshape(kappa.shape[0], -1)[:, 0]


def class_centres(class_weights: Tensor, labels: Tensor, radius: float = DEFAULT_RADIUS) -> Tensor:
    """w_c: each sample's frozen class centre, unit-normalised then scaled to ``radius`` (B, d)."""
    w = class_weights[labels.reshape(-1)]
    return w / w.norm(dim=1, keepdim=True) * radius


def vmf_loss(
    mu: Tensor,
    kappa: Tensor,
    wc: Tensor,
    *,
    radius: float = DEFAULT_RADIUS,
    mode: Literal["stable", "reference"] = "stable",
) -> dict[str, Tensor]:
    """Per-sample SCF loss and its parts (each (B, 1)): ``losses``, ``l1`` = −κ·cos, ``l2``, ``l3``.

    stable: l2 = −v·log κ and l3 = log I_v(κ); the sum l2 + l3 is formed without the cancelling log κ
      terms, in float64, so it stays finite for κ → 0 and accurate at κ = 1e5.
    reference: l2 = −v·log(1e-6 + κ), l3 = log(1e-6 + float32(ive(v, κ))) + κ, the authors' arithmetic.
    """
    d = mu.shape[1]
    v = d / 2.0 - 1.0
    kappa = kappa.reshape(-1, 1)
    const = (d / 2.0) * math.log(2.0 * math.pi) + d * math.log(radius)
    if mode == "reference":
        cos = (mu * wc).sum(dim=1, keepdim=True) / radius
        l1 = -kappa * cos
        l2 = -v * torch.log(1e-6 + kappa)
        # Their ive() hands back a float32 tensor whatever the input dtype, so log(1e-6 + ive) is taken
        # in float32 even for float64 κ; only then is κ added (in κ's dtype). Keep that rounding.
        ive32 = torch.exp(log_iv(v, kappa.to(torch.float64)) - kappa.to(torch.float64)).to(torch.float32)
        l3 = torch.log(1e-6 + ive32).to(kappa.dtype) + kappa
        return {"losses": l1 + l2 + l3 + const, "l1": l1, "l2": l2, "l3": l3}
    if mode != "stable":
        raise ValueError(f"unknown SCF loss mode {mode!r}; choose 'stable' or 'reference'")
    dtype = torch.promote_types(mu.dtype, kappa.dtype)
    mu64, wc64, k64 = mu.to(torch.float64), wc.to(torch.float64), kappa.to(torch.float64)
    cos = (mu64 * wc64).sum(dim=1, keepdim=True) / radius
    l1 = -k64 * cos
    g = log_iv_minus_vlog(v, k64)  # = l2 + l3, finite at κ = 0
    log_k = torch.log(k64)
    losses = l1 + g + const
    return {
        "losses": losses.to(dtype),
        "l1": l1.to(dtype),
        "l2": (-v * log_k).to(dtype),
        "l3": (g + v * log_k).to(dtype),
    }


def loss(
    mu: Tensor,
    log_kappa: Tensor,
    labels: Tensor,
    *,
    class_weights: Tensor,
    radius: float = DEFAULT_RADIUS,
    mode: Literal["stable", "reference"] = "stable",
    **_: object,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean SCF loss over the batch. ``class_weights`` (C, d) is the frozen margin head's class matrix."""
    mu = F.normalize(mu.detach(), dim=1)
    wc = class_centres(class_weights.detach(), labels, radius).to(mu.dtype)
    parts = vmf_loss(mu, torch.exp(log_kappa), wc, radius=radius, mode=mode)
    total = parts["losses"].mean()
    kappa = torch.exp(log_kappa.detach())
    return total, {"vmf": total.detach(), "kappa_mean": kappa.mean(), "kappa_min": kappa.min()}


def log_normaliser(kappa: Tensor, d: int) -> Tensor:
    """log C_d(κ) = (d/2−1)·log κ − (d/2)·log 2π − log I_{d/2−1}(κ); finite at κ = 0 (float64 inside)."""
    v = d / 2.0 - 1.0
    k64 = kappa.to(torch.float64)
    out = -log_iv_minus_vlog(v, k64) - (d / 2.0) * math.log(2.0 * math.pi)
    return out.to(kappa.dtype)


def pair_score(mu_a: Tensor, kappa_a: Tensor, mu_b: Tensor, kappa_b: Tensor) -> Tensor:
    """Eqn 13: log mutual likelihood of two vMFs, log C_d(κa) + log C_d(κb) − log C_d(κ̃), κ̃ = ‖κa μa + κb μb‖.

    Row-aligned pairs (N, d) and κ (N,) or (N, 1); returns (N,), higher = more alike. μ should be unit.
    The radius constants are dropped. Symmetric; increasing in cos θ at fixed κ, because
    d/dκ̃ (−log C_d(κ̃)) = I_{v+1}(κ̃)/I_v(κ̃) > 0.
    """
    mu_a, kappa_a, mu_b, kappa_b = as_tensors(mu_a, kappa_a, mu_b, kappa_b)
    d = mu_a.shape[-1]
    ka, kb = kappa_a.reshape(-1, 1), kappa_b.reshape(-1, 1)
    dtype = mu_a.dtype
    ka64, kb64 = ka.to(torch.float64), kb.to(torch.float64)
    # cos θ in the inputs' precision (no (N, d) float64 copies); the Bessel parts run in float64
    cos = rowwise_dot(mu_a, mu_b.to(mu_a.dtype)).to(torch.float64)[:, None]
    # ‖κa μa + κb μb‖² expanded through cos θ, clamped at 0 against rounding when the two cancel
    k_tilde = torch.sqrt(torch.clamp(ka64 * ka64 + kb64 * kb64 + 2.0 * ka64 * kb64 * cos, min=0.0))
    score = log_normaliser(ka64, d) + log_normaliser(kb64, d) - log_normaliser(k_tilde, d)
    return score.reshape(-1).to(dtype)


def score_matrix(mu_a: Tensor, kappa_a: Tensor, mu_b: Tensor, kappa_b: Tensor) -> Tensor:
    """Eqn 13 for every a against every b (Na, Nb)."""
    mu_a, kappa_a, mu_b, kappa_b = as_tensors(mu_a, kappa_a, mu_b, kappa_b)
    d = mu_a.shape[-1]
    ka = kappa_a.reshape(-1).to(torch.float64)
    kb = kappa_b.reshape(-1).to(torch.float64)
    cos = (mu_a @ mu_b.to(mu_a.dtype).T).to(torch.float64)
    k_tilde = torch.sqrt(
        torch.clamp(ka[:, None] ** 2 + kb[None, :] ** 2 + 2.0 * ka[:, None] * kb[None, :] * cos, min=0.0)
    )
    score = log_normaliser(ka, d)[:, None] + log_normaliser(kb, d)[None, :] - log_normaliser(k_tilde, d)
    return score.to(mu_a.dtype)


def fuse(mu: Tensor, kappa: Tensor, **_: object) -> tuple[Tensor, Tensor]:
    """Eqn 14: s = Σ κ_i μ_i; direction s/‖s‖, concentration ‖s‖. Returns μ (d,), κ (1,).

    Identical directions add their κ. An empty template raises ValueError. If the directions cancel
    exactly (‖s‖ = 0) the concentration is 0 and the direction is the zero vector (no information).
    """
    mu, kappa = as_tensors(mu, kappa)
    if mu.ndim != 2 or mu.shape[0] == 0:
        raise ValueError(f"cannot fuse an empty template (mu has shape {tuple(mu.shape)})")
    s = (kappa.reshape(-1, 1) * mu).sum(dim=0)
    norm = s.norm()
    direction = torch.where(
        norm > 0, s / torch.clamp(norm, min=torch.finfo(s.dtype).tiny), torch.zeros_like(s)
    )
    return direction, norm.reshape(1)
