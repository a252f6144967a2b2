"""CurricularFace (TFace): ArcFace target plus hard negatives re-weighted by an EMA `t` of the target cos.

Kept from the reference: ``t`` is updated from the batch's mean target cosine *before* it is used in the
same call; the hard mask is ``cos θ_j > cos(θ_y + m)`` (computed on every column); hard negatives become
``cos θ_j·(t + cos θ_j)``; the target uses the θ > π − m fallback ``cos θ − sin(π − m)·m``.
"""

from __future__ import annotations

import math

import torch

from facepipe.models.heads.margins import MarginHead, flat_labels, safe_sin_from_cos, target_mask

__all__ = ["CurricularFace"]


class CurricularFace(MarginHead):
    def __init__(self, embedding_size=None, num_classes=None, s: float = 64.0, m: float = 0.5, alpha=0.1):
        super().__init__(embedding_size, num_classes, s)
        self.m, self.alpha = float(m), float(alpha)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m
        self.register_buffer("t", torch.zeros(1))

    def margin(self, cos, labels, norms=None):
        labels = flat_labels(labels)
        mask = target_mask(cos, labels)
        valid = labels != -1
        target = torch.zeros(cos.shape[0], 1, dtype=cos.dtype, device=cos.device)
        target[valid] = cos[valid, labels[valid]].unsqueeze(1)
        cos_theta_m = target * self.cos_m - safe_sin_from_cos(target) * self.sin_m
        final_target = torch.where(target > self.threshold, cos_theta_m, target - self.mm)
        with torch.no_grad():
            # Under PartialFC a row's target lives on one worker only: share every row's target cosine
            # (it sets the hard-example mask of all workers) and whether it has one.
            shared = torch.cat([target, valid.to(target.dtype).unsqueeze(1)], dim=1)
            shared = self._sum_over_workers(shared)
            all_target, has_target = shared[:, :1], shared[:, 1] > 0
            all_cos_theta_m = all_target * self.cos_m - safe_sin_from_cos(all_target) * self.sin_m
            if bool(has_target.any()):
                mean_target = all_target[has_target].mean().to(self.t.dtype)
                self.t.copy_(mean_target * self.alpha + (1 - self.alpha) * self.t)
        # Rows without a target anywhere (label -1) keep plain cosines.
        hard = (cos > all_cos_theta_m) & has_target.unsqueeze(1)
        t = self.t.to(cos.dtype)
        out = torch.where(hard, cos * (t + cos), cos)
        out = torch.where(mask, final_target.expand_as(cos), out)
        return out * self.s
