"""Losses, scores and fusion of every uncertainty method stay finite at the edges.

Edges: cos θ = ±1, σ² → 0 (including exactly 0) or very large, κ → 0 or 1e5, and templates of zero or one
image. Decision for empty templates: fusion raises ValueError (an empty template carries no face; the
caller must decide what to do, e.g. skip the pair), for every method alike.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from facepipe.uncertainty import build_uncertainty_head, get_method, pfe, probface, scf, score_pairs

D = 64
DTYPES = [torch.float32, torch.float64]


def _unit(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1).to(dtype)


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sigma_sq", [0.0, 1e-30, 1e-6, 1.0, 1e30])
def test_pfe_and_probface_scores_finite(dtype, sigma_sq):
    a = _unit(3, dtype)
    b = torch.stack([a[0], -a[1], _unit(1, dtype, 1)[0]])  # cos θ = 1, −1 and random
    s_pfe = torch.full((3, D), sigma_sq, dtype=dtype)
    s_pf = torch.full((3, 1), sigma_sq, dtype=dtype)
    assert _finite(pfe.pair_score(a, s_pfe, b, s_pfe))
    assert _finite(pfe.score_matrix(a, s_pfe, b, s_pfe))
    assert _finite(probface.pair_score(a, s_pf, b, s_pf))
    assert _finite(probface.score_matrix(a, s_pf, b, s_pf))
    # identical faces never score below opposite ones (equal once σ² swamps 1 − cos θ)
    scores = probface.pair_score(a, s_pf, b, s_pf)
    assert float(scores[0]) >= float(scores[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log_sigma_sq", [-30.0, -13.8, 0.0, 30.0])
def test_pfe_and_probface_losses_and_gradients_finite(dtype, log_sigma_sq):
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    mu = _unit(6, dtype)
    mu[1] = mu[0]  # a genuine pair at cos θ = 1
    mu[3] = -mu[2]  # and one at cos θ = −1
    for method, width in (("pfe", D), ("probface", 1)):
        log_s = torch.full((6, width), log_sigma_sq, dtype=dtype, requires_grad=True)
        total, terms = get_method(method).loss(mu, log_s, labels)
        assert _finite(total), (method, terms)
        total.backward()
        assert _finite(log_s.grad), method


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kappa", [0.0, 1e-8, 1.0, 300.0, 1e5])
def test_scf_scores_and_loss_finite(dtype, kappa):
    a = _unit(3, dtype)
    b = torch.stack([a[0], -a[1], _unit(1, dtype, 2)[0]])
    k = torch.full((3, 1), kappa, dtype=dtype)
    assert _finite(scf.pair_score(a, k, b, k))
    assert _finite(scf.score_matrix(a, k, b, k))
    if kappa > 0:  # the head's κ is exp(log κ) ≥ 1e-6, never 0; the loss takes log κ
        log_k = torch.full((3, 1), math.log(kappa), dtype=dtype, requires_grad=True)
        weights = torch.cat([a[:1], -a[1:2], a[2:]]).to(dtype)  # class centres at cos θ = 1, −1, 1
        total, _ = scf.loss(a, log_k, torch.arange(3), class_weights=weights)
        assert _finite(total)
        total.backward()
        assert _finite(log_k.grad)


def test_scf_loss_at_tiny_kappa_in_float32():
    # log κ = −30 (κ ≈ 9e-14): the −v·log κ and log I_v(κ) terms cancel inside, so nothing overflows
    mu = _unit(2, torch.float32)
    log_k = torch.full((2, 1), -30.0, requires_grad=True)
    total, _ = scf.loss(mu, log_k, torch.tensor([0, 1]), class_weights=mu)
    total.backward()
    assert _finite(total) and _finite(log_k.grad)


@pytest.mark.parametrize("method", ["pfe", "probface", "scf"])
def test_empty_template_raises_and_single_image_is_itself(method):
    spec = get_method(method)
    mu = _unit(1, torch.float64)
    u = torch.full((1, D if method == "pfe" else 1), 0.3, dtype=torch.float64)
    with pytest.raises(ValueError, match="empty template"):
        spec.fuse(mu[:0], u[:0])
    mu_t, u_t = spec.fuse(mu, u)
    assert torch.allclose(mu_t, mu[0]) and torch.allclose(u_t, u[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fusion_finite_at_extreme_uncertainty(dtype):
    mu = _unit(3, dtype)
    s = torch.tensor([[0.0], [1e-30], [1e30]], dtype=dtype)
    for rule in ("paper", "min"):
        mu_t, s_t = pfe.fuse(mu, s.expand(3, D), rule=rule)
        assert _finite(mu_t) and _finite(s_t)
    mu_t, s_t = probface.fuse(mu, s)
    assert _finite(mu_t) and _finite(s_t)
    # the (near-)certain images dominate
    assert float((mu_t * mu[2]).sum()) < 0.5
    k = torch.tensor([[0.0], [1e-8], [1e5]], dtype=dtype)
    d_t, k_t = scf.fuse(mu, k)
    assert _finite(d_t) and _finite(k_t)


def test_scf_fusion_of_cancelling_directions_is_defined():
    mu = _unit(1, torch.float64)
    direction, kappa = scf.fuse(torch.cat([mu, -mu]), torch.tensor([[5.0], [5.0]], dtype=torch.float64))
    assert float(kappa) == 0.0 and bool((direction == 0).all())


def test_heads_produce_finite_uncertainty_for_extreme_inputs():
    for method in ("pfe", "probface", "scf"):
        head = build_uncertainty_head(method, 8, 16, feature_hw=(2, 2)).eval()
        with torch.no_grad():
            for scale in (0.0, 1e-6, 1e6):
                out = head(torch.full((2, 8, 2, 2), scale))
                assert _finite(out), (method, scale)
                assert float(out.min()) >= math.log(1e-6) - 1e-6  # σ², κ ≥ 1e-6


def test_chunked_numpy_scoring_matches_one_shot():
    import numpy as np

    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=(50, D)), rng.normal(size=(50, D))
    mu_a /= np.linalg.norm(mu_a, axis=1, keepdims=True)
    mu_b /= np.linalg.norm(mu_b, axis=1, keepdims=True)
    for method, width in (("pfe", D), ("probface", 1), ("scf", 1)):
        u_a, u_b = rng.uniform(0.1, 100, size=(50, width)), rng.uniform(0.1, 100, size=(50, width))
        chunked = score_pairs(method, mu_a, u_a, mu_b, u_b, chunk=7)
        whole = get_method(method).pair_score(*(torch.as_tensor(x) for x in (mu_a, u_a, mu_b, u_b))).numpy()
        assert chunked.dtype == np.float64 and chunked.shape == (50,)
        np.testing.assert_allclose(chunked, whole, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown uncertainty method"):
        get_method("gaussian")
