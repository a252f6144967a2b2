"""SphereFace family: the original A-Softmax (m=4, λ annealing), opensphere's SphereFace and SphereFace2.

A-Softmax works on *unnormalised* features: logits are ``‖x‖·cos θ`` and the target is blended with
``ψ(θ) = (−1)^k·cos(mθ) − 2k`` through the annealed λ: ``(λ·‖x‖cos θ + ‖x‖ψ(θ)) / (1 + λ)``.
Two λ schedules are built in, both ``max(λ_min, base·(1 + γ·it)^−power)`` with ``it`` incremented
before use on every training call: ``"caffe"`` (base 1000, γ 0.12, power 1, λ_min 5, the original
prototxt) and ``"clcarwin"`` (base 1500, γ 0.1, power 1, λ_min 5, the popular PyTorch port).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facepipe.models.heads.margins import MarginHead, flat_labels, safe_acos, target_mask

__all__ = [
    "LAMBDA_SCHEDULES",
    "annealed_lambda",
    "psi_chebyshev",
    "psi_taylor",
    "a_softmax_logits",
    "ASoftmax",
    "opensphere_sphereface_logits",
    "OpenSphereFace",
    "sphereface2_bias_init",
    "SphereFace2",
]

LAMBDA_SCHEDULES: dict[str, dict[str, float]] = {
    "caffe": {"base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 5.0},
    "clcarwin": {"base": 1500.0, "gamma": 0.1, "power": 1.0, "lambda_min": 5.0},
}

# The clcarwin port computes k with this truncated π; it only matters exactly at the k boundaries.
_CLCARWIN_PI = 3.14159265


def annealed_lambda(it: int, base: float, gamma: float, power: float, lambda_min: float) -> float:
    """``max(λ_min, base·(1 + γ·it)^−power)``."""
    return max(lambda_min, base * (1.0 + gamma * it) ** (-power))


def _chebyshev_cos_m_theta(cos: torch.Tensor, m: int) -> torch.Tensor:
    """``cos(mθ)`` as a polynomial in ``cos θ`` (m = 0..4), as in the original implementations."""
    polys = {
        0: lambda x: torch.ones_like(x),
        1: lambda x: x,
        2: lambda x: 2 * x**2 - 1,
        3: lambda x: 4 * x**3 - 3 * x,
        4: lambda x: 8 * x**4 - 8 * x**2 + 1,
    }
    if m not in polys:
        raise ValueError(f"A-Softmax margin m must be an integer 0..4, got {m}")
    return polys[m](cos)


def psi_chebyshev(cos: torch.Tensor, m: int = 4, pi: float = _CLCARWIN_PI) -> torch.Tensor:
    """``ψ(θ) = (−1)^k·cos(mθ) − 2k``, k = ⌊mθ/π⌋ (k is piecewise constant: no gradient through it)."""
    with torch.no_grad():
        k = torch.floor(m * torch.acos(cos.clamp(-1.0, 1.0)) / pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * _chebyshev_cos_m_theta(cos, m) - 2.0 * k


def psi_taylor(cos: torch.Tensor, m: int = 4) -> torch.Tensor:
    """clcarwin's ``myphi``: truncated Taylor series of cos(mθ) (with its odd x⁹ term), clamped to [−m, 1]."""
    x = safe_acos(cos) * m
    series = (
        1
        - x**2 / math.factorial(2)
        + x**4 / math.factorial(4)
        - x**6 / math.factorial(6)
        + x**8 / math.factorial(8)
        - x**9 / math.factorial(9)
    )
    return series.clamp(-float(m), 1.0)


def a_softmax_logits(
    cos: torch.Tensor,
    labels: torch.Tensor,
    norms: torch.Tensor,
    lam: float,
    m: int = 4,
    phi: str = "chebyshev",
) -> torch.Tensor:
    """A-Softmax logits: ``‖x‖cos θ``, target ``‖x‖cos θ − ‖x‖cos θ/(1+λ) + ‖x‖ψ(θ)/(1+λ)``."""
    if phi == "chebyshev":
        psi = psi_chebyshev(cos, m)
    elif phi == "taylor":
        psi = psi_taylor(cos, m)
    else:
        raise ValueError(f"phi must be 'chebyshev' or 'taylor', got {phi!r}")
    norms = norms.reshape(-1, 1)
    cos_x = cos * norms
    psi_x = psi * norms
    target = cos_x - cos_x / (1.0 + lam) + psi_x / (1.0 + lam)
    return torch.where(target_mask(cos, labels), target, cos_x)


class ASoftmax(MarginHead):
    """SphereFace A-Softmax with λ annealing.

    The iteration counter is a buffer; it advances on every call in training mode (and, when
    ``lambda_override`` is None, λ follows the schedule). In eval mode λ stays at its last value.
    ``s`` is unused (the logits carry ``‖x‖``), kept for a uniform signature.
    """

    needs_norms = True

    def __init__(
        self, embedding_size=None, num_classes=None, m: int = 4, schedule: str = "caffe",
        phi: str = "chebyshev", s: float = 1.0,
        # the λ annealing λ = max(λ_min, base·(1 + γ·it)^(−power)); None takes the schedule's value
        base: float | None = None, gamma: float | None = None, power: float | None = None,
        lambda_min: float | None = None,
    ):  # fmt: skip
        super().__init__(embedding_size, num_classes, s)
        if schedule not in LAMBDA_SCHEDULES:
            raise ValueError(f"unknown λ schedule {schedule!r}; known: {sorted(LAMBDA_SCHEDULES)}")
        params = dict(LAMBDA_SCHEDULES[schedule])
        for key, value in (("base", base), ("gamma", gamma), ("power", power), ("lambda_min", lambda_min)):
            if value is not None:
                params[key] = float(value)
        self.schedule = params
        if int(m) != m or m < 1:  # int() used to turn another head's m=0.35 into a silent m=0
            raise ValueError(f"A-Softmax m must be a whole number >= 1 (the paper's is 4), got {m!r}")
        self.m, self.phi = int(m), phi
        self.register_buffer("it", torch.zeros((), dtype=torch.long))

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.xavier_uniform_(self.weight)

    @property
    def current_lambda(self) -> float:
        return annealed_lambda(int(self.it), **self.schedule)

    def margin(self, cos, labels, norms=None):
        if norms is None:
            raise ValueError("A-Softmax needs the embedding norms")
        if self.training:
            self.it += 1
        return a_softmax_logits(cos, labels, norms, self.current_lambda, self.m, self.phi)


def opensphere_sphereface_logits(
    cos: torch.Tensor, labels: torch.Tensor, s: float = 64.0, m: float = 1.7
) -> torch.Tensor:
    """opensphere's SphereFace ("Revived"): ``s·ψ(θ)`` on the target, ψ = (−1)^k cos(mθ) − 2k, k = ⌊mθ/π⌋.

    As in opensphere the margin is a detached offset, so the gradient is that of ``s·cos θ``.
    """
    mask = target_mask(cos, labels)
    with torch.no_grad():
        theta = torch.acos(cos.clamp(-1.0 + 1e-5, 1.0 - 1e-5))
        m_theta = torch.where(mask, theta * m, theta)
        k = torch.floor(m_theta / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        phi = sign * torch.cos(m_theta) - 2.0 * k
        delta = phi - cos
    return s * (cos + delta)


class OpenSphereFace(MarginHead):
    def __init__(self, embedding_size=None, num_classes=None, s: float = 64.0, m: float = 1.7):
        super().__init__(embedding_size, num_classes, s)
        self.m = float(m)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.xavier_normal_(self.weight)

    def margin(self, cos, labels, norms=None):
        return opensphere_sphereface_logits(cos, labels, self.s, self.m)


def sphereface2_bias_init(num_classes: int, alpha: float, r: float, m: float, t: float) -> float:
    """SphereFace2's analytic bias initialisation (balances the one-vs-all losses at start)."""
    z = alpha / ((1.0 - alpha) * (num_classes - 1.0))
    ay = r * (2.0 * 0.5**t - 1.0 - m)
    ai = r * (2.0 * 0.5**t - 1.0 + m)
    temp = (1.0 - z) ** 2 + 4.0 * z * math.exp(ay - ai)
    return math.log(2.0 * z) - ai - math.log(1.0 - z + math.sqrt(temp))


class SphereFace2(MarginHead):
    """SphereFace2-C: one binary classifier per class (weighted BCE), ``g(cos) = 2((cos+1)/2)^t − 1``.

    Logits ``r·(g(cos θ) ∓ m) + b`` (−m on the target, +m elsewhere; detached offset as in opensphere);
    loss: BCE with weight ``lw·C/r·(α on the target, 1−α elsewhere)``, averaged over all B×C entries.
    ``num_classes`` must be known (it enters the bias init and the loss weight): for a margin-only head
    pass ``total_classes``.
    """

    loss_kind = "bce"

    def __init__(
        self, embedding_size=None, num_classes=None,
        alpha: float = 0.8, r: float = 64.0, m: float = 0.5, t: float = 3.0, lw: float = 50.0,
        total_classes: int | None = None, s: float | None = None,
    ):  # fmt: skip
        super().__init__(embedding_size, num_classes, r if s is None else s)
        self.total_classes = total_classes or num_classes
        if self.total_classes is None or self.total_classes < 2:
            raise ValueError("SphereFace2 needs the total number of classes (>= 2)")
        self.alpha, self.r, self.m, self.t, self.lw = float(alpha), float(r), float(m), float(t), float(lw)
        b = sphereface2_bias_init(self.total_classes, self.alpha, self.r, self.m, self.t)
        self.bias = nn.Parameter(torch.tensor([b], dtype=torch.float32))

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.xavier_normal_(self.weight)

    def margin(self, cos, labels, norms=None):
        one_hot = target_mask(cos, labels).to(cos.dtype)
        with torch.no_grad():
            g = 2.0 * ((cos + 1.0) / 2.0).pow(self.t) - 1.0
            g = g - self.m * (2.0 * one_hot - 1.0)
            delta = g - cos
        return self.r * (cos + delta) + self.bias.to(cos.dtype)

    def bce_weight(self, one_hot: torch.Tensor) -> torch.Tensor:
        weight = self.alpha * one_hot + (1.0 - self.alpha) * (1.0 - one_hot)
        return self.lw * self.total_classes / self.r * weight

    def entry_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-entry weighted BCE (B, C); PartialFC sums these across shards."""
        one_hot = target_mask(logits, labels).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(
            logits, one_hot, weight=self.bce_weight(one_hot), reduction="none"
        )

    def logits_loss(self, logits, labels):
        return self.entry_losses(logits, flat_labels(labels)).mean()
