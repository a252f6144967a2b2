"""log I_v(κ) for the vMF normaliser: accuracy against high precision, gradients, float32 safety."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch

from facepipe.uncertainty.bessel import (
    bessel_ratio,
    debye_polynomials,
    log_iv,
    log_iv_minus_vlog,
    log_ive,
)

V = 255.0  # d = 512
KAPPAS = np.geomspace(1.0, 1e5, 61)


def _reference_log_iv(v: float, kappas: np.ndarray) -> np.ndarray:
    """High-precision log I_v: mpmath at 40 digits when installed, else scipy's ive in float64 (κ ≥ 100)."""
    try:
        import mpmath
    except ImportError:  # pragma: no cover - mpmath ships with torch's sympy dependency
        kappas = kappas[kappas >= 100]  # where float64 ive does not underflow for v = 255
        return np.log(scipy.special.ive(v, kappas)) + kappas
    with mpmath.workdps(40):
        return np.array([float(mpmath.log(mpmath.besseli(v, mpmath.mpf(float(k))))) for k in kappas])


def test_debye_polynomials_match_closed_forms():
    u = debye_polynomials()
    p = 0.37
    assert u[0] == (1.0,)
    assert math.isclose(np.polyval(u[1][::-1], p), (3 * p - 5 * p**3) / 24, rel_tol=1e-15)
    assert math.isclose(
        np.polyval(u[2][::-1], p), (81 * p**2 - 462 * p**4 + 385 * p**6) / 1152, rel_tol=1e-14
    )
    # at p = 1 they reduce to the Stirling series coefficients of 1/Γ: u_1(1) = −1/12, u_2(1) = 1/288
    assert math.isclose(sum(u[1]), -1 / 12, rel_tol=1e-15) and math.isclose(sum(u[2]), 1 / 288, rel_tol=1e-14)


@pytest.mark.parametrize("v", [V, 63.0, 127.0])
def test_log_iv_matches_high_precision_reference(v):
    ref = _reference_log_iv(v, KAPPAS)
    kappas = KAPPAS[-len(ref) :]
    got = log_iv(v, torch.as_tensor(kappas, dtype=torch.float64)).numpy()
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1.0)
    assert rel.max() < 1e-6
    assert np.abs(got - ref).max() < 1e-9 * max(1.0, np.abs(ref).max())  # the margin is large: ~1e-13 seen
    print(
        f"log I_{v:g}(κ), κ∈[1,1e5]: max rel err {rel.max():.3g}, max abs err {np.abs(got - ref).max():.3g}"
    )


def test_float32_input_is_accurate_to_float32_rounding():
    ref = _reference_log_iv(V, KAPPAS)
    kappas32 = torch.as_tensor(KAPPAS[-len(ref) :], dtype=torch.float32)
    # compare at the float32 κ actually passed, so only the output rounding is measured
    ref32 = _reference_log_iv(V, kappas32.double().numpy())
    got = log_iv(V, kappas32)
    assert got.dtype == torch.float32
    rel = np.abs(got.double().numpy() - ref32) / np.abs(ref32)
    assert rel.max() < 1e-6


def test_matches_scipy_where_ive_does_not_underflow():
    kappas = np.geomspace(100.0, 1e5, 25)
    want = np.log(scipy.special.ive(V, kappas))
    got = log_ive(V, torch.as_tensor(kappas)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_gradcheck_log_iv_and_g():
    kappa = torch.tensor([1.0, 3.0, 50.0, 255.0, 1000.0, 3e4, 1e5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: log_iv(V, k), (kappa,))
    small = torch.tensor([1e-3, 0.5, 7.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: log_iv_minus_vlog(V, k), (small,))
    assert torch.autograd.gradcheck(lambda k: log_iv(63.0, k), (kappa,))


def test_derivative_is_bessel_ratio_plus_v_over_kappa():
    mpmath = pytest.importorskip("mpmath")
    kappas = [1.0, 30.0, 300.0, 3000.0, 3e4]
    k = torch.tensor(kappas, dtype=torch.float64, requires_grad=True)
    log_iv(V, k).sum().backward()
    with mpmath.workdps(40):
        ratio = [float(mpmath.besseli(V + 1, x) / mpmath.besseli(V, x)) for x in kappas]
    want = np.array(ratio) + V / np.array(kappas)
    np.testing.assert_allclose(k.grad.numpy(), want, rtol=1e-10)
    np.testing.assert_allclose(
        bessel_ratio(V, torch.tensor(kappas, dtype=torch.float64)).numpy(), ratio, rtol=1e-10
    )


def test_float32_finite_values_and_gradients_over_the_whole_range():
    kappa = torch.tensor([0.0, 1e-30, 1e-6, 1.0, 1e3, 1e5, 1e6], dtype=torch.float32, requires_grad=True)
    g = log_iv_minus_vlog(V, kappa)
    assert g.dtype == torch.float32 and bool(torch.isfinite(g).all())
    g.sum().backward()
    assert bool(torch.isfinite(kappa.grad).all())
    # g(0) = −v·log 2 − log Γ(v+1), the small-κ limit of I_v(κ) ≈ (κ/2)^v / Γ(v+1)
    assert math.isclose(float(g[0].detach()), -V * math.log(2) - math.lgamma(V + 1), rel_tol=1e-6)
    assert float(log_iv(V, torch.tensor(0.0))) == float("-inf")


def test_ratio_limits():
    k = torch.tensor([0.0, 1e-8, 1e5], dtype=torch.float64)
    r = bessel_ratio(V, k)
    assert float(r[0]) == 0.0
    assert math.isclose(float(r[1]), 1e-8 / (2 * (V + 1)), rel_tol=1e-6)  # I_{v+1}/I_v ≈ κ/(2(v+1)) near 0
    assert 0.99 < float(r[2]) < 1.0


def test_rejects_small_order_and_negative_kappa():
    with pytest.raises(ValueError, match="order"):
        log_iv(2.0, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="κ ≥ 0"):
        log_iv(V, torch.tensor([-1.0]))
