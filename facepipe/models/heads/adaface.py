"""AdaFace: a margin that adapts to image quality, with the feature norm as the quality proxy.

Kept from the reference (mk-minchul/AdaFace ``head.py``): norms are clipped to [0.001, 100] and detached;
the EMA of the batch mean and *unbiased* std of the norms is updated on every call (eval mode too)
*before* the margin of the same batch is computed; cos θ is clamped to [−1+eps, 1−eps]; θ + g_angle is
clipped to [eps, π−eps] on every entry.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from facepipe.models.heads.margins import MarginHead, target_mask

__all__ = ["AdaFace"]


class AdaFace(MarginHead):
    """Target ``s·(cos(clip(θ_y − m·g, eps, π−eps)) − (m + m·g))``, ``g = clip(h·(‖x‖−μ)/(σ+eps), −1, 1)``."""

    needs_norms = True

    def __init__(
        self, embedding_size=None, num_classes=None, s: float = 64.0, m: float = 0.4, h: float = 0.333,
        # the running statistics of the feature norms: EMA momentum, the σ floor and their start values
        t_alpha: float = 0.01, eps: float = 1e-3,
        init_batch_mean: float = 20.0, init_batch_std: float = 100.0,
    ):  # fmt: skip
        super().__init__(embedding_size, num_classes, s)
        self.m, self.h, self.t_alpha, self.eps = float(m), float(h), float(t_alpha), float(eps)
        self.register_buffer("batch_mean", torch.full((1,), float(init_batch_mean)))
        self.register_buffer("batch_std", torch.full((1,), float(init_batch_std)))

    def reset_parameters(self) -> None:
        if self.weight is not None:
            # The reference's init: uniform directions, unit norm per class.
            nn.init.uniform_(self.weight, -1.0, 1.0)
            with torch.no_grad():
                self.weight.copy_(self.weight.renorm(2, 0, 1e-5).mul(1e5))

    @torch.no_grad()
    def _update_stats(self, safe_norms: torch.Tensor) -> None:
        if safe_norms.numel() < 2:
            return  # an unbiased std needs two samples; keep the running values
        mean = safe_norms.mean().to(self.batch_mean.dtype)
        std = safe_norms.std().to(self.batch_std.dtype)
        self.batch_mean.copy_(mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean)
        self.batch_std.copy_(std * self.t_alpha + (1 - self.t_alpha) * self.batch_std)

    def margin(self, cos, labels, norms=None):
        if norms is None:
            raise ValueError("AdaFace needs the embedding norms")
        cos = cos.clamp(-1 + self.eps, 1 - self.eps)
        safe_norms = norms.reshape(-1, 1).clip(min=0.001, max=100).detach()
        self._update_stats(safe_norms)
        scaler = (safe_norms - self.batch_mean.to(cos.dtype)) / (self.batch_std.to(cos.dtype) + self.eps)
        scaler = torch.clip(scaler * self.h, -1, 1)
        mask = target_mask(cos, labels).to(cos.dtype)
        g_angular = -self.m * scaler
        theta = torch.acos(cos)  # finite gradient: cos is clamped away from ±1
        theta_m = torch.clip(theta + mask * g_angular, min=self.eps, max=math.pi - self.eps)
        g_add = self.m + self.m * scaler
        return (torch.cos(theta_m) - mask * g_add) * self.s

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None):
        """Raw embeddings, or (as the reference) unit embeddings plus their original ``norms``."""
        if norms is None:
            cos, norms = self.cosine(embeddings)
        else:
            if self.weight is None:
                raise RuntimeError("AdaFace was built margin-only; call margin(cos, labels, norms)")
            cos = torch.nn.functional.linear(embeddings, torch.nn.functional.normalize(self.weight, dim=1))
        return self.margin(cos, labels, norms)
