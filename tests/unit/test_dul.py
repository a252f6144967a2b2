"""DUL-rgs: the head's two branches, the Gaussian NLL onto class centres, and its registry entry."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from facepipe.uncertainty import build_uncertainty_head, dul, get_method, pfe


def test_head_outputs_mean_and_log_variance_and_u_is_sigma_sq():
    head = build_uncertainty_head("dul", 8, 16, feature_hw=(2, 2))
    out = head(torch.randn(5, 8, 2, 2))
    assert out.shape == (5, 32)
    u = dul.to_uncertainty(out)
    assert u.shape == (5, 16) and torch.all(u > 0)


def test_loss_is_the_gaussian_nll_of_the_centres():
    torch.manual_seed(0)
    centres = torch.randn(4, 6)
    labels = torch.tensor([0, 1, 1, 3])
    mean, log_var = torch.randn(4, 6), torch.randn(4, 6)
    total, terms = dul.loss(torch.zeros(4, 6), torch.cat([mean, log_var], 1), labels, class_weights=centres)
    w = F.normalize(centres[labels], dim=1)
    m = F.normalize(mean, dim=1)
    want = 0.5 * (((w - m) ** 2) / torch.exp(log_var) + log_var).sum(1).mean()
    assert float(total) == pytest.approx(float(want), rel=1e-6)
    assert set(terms) == {"nll", "centre_distance", "sigma_sq_mean"}
    with pytest.raises(ValueError, match="class_weights"):
        dul.loss(torch.zeros(4, 6), torch.cat([mean, log_var], 1), labels)


def test_training_raises_variance_for_samples_far_from_their_centre():
    torch.manual_seed(1)
    head = dul.build_head(12, 6)
    feats = torch.randn(64, 12)
    labels = torch.arange(64) % 4
    centres = torch.randn(4, 6)
    noisy = torch.zeros(64, dtype=torch.bool)
    noisy[::2] = True
    feats[noisy] = feats[noisy] * 5.0  # far-off inputs: the mean branch cannot fit these as well
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        total, _ = dul.loss(None, head(feats), labels, class_weights=centres)
        opt.zero_grad()
        total.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        var = dul.to_uncertainty(head(feats)).mean(1)
    assert float(total.detach()) < 0.0
    assert float(var[noisy].mean()) > float(var[~noisy].mean())


def test_registry_entry_scores_and_fuses_like_pfe():
    spec = get_method("dul")
    assert spec.needs_class_centres and spec.batching == "plain"
    assert spec.uncertainty_kind == "sigma_sq" and spec.uncertainty_size(512) == 512
    assert spec.model_name == "facepipe-dul"
    assert spec.pair_score is pfe.pair_score and spec.fuse is pfe.fuse
