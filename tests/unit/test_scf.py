"""SCF: golden case 07 (the authors' vMF loss, reference mode), the stable training loss, Eqn 13 and 14."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from facepipe.uncertainty import build_uncertainty_head, get_method, scf
from facepipe.uncertainty.bessel import log_ive
from tests.fixture_dirs import missing_fixture

DTYPES = {"f32": torch.float32, "f64": torch.float64}
RTOL = {"f32": 1e-5, "f64": 1e-6}  # README case 07


@pytest.fixture(scope="module")
def case07(golden_dir):
    path = golden_dir / "case07_scf_kl_vmf.npz"
    if not path.exists():
        missing_fixture(f"{path} is absent")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _inputs(c: dict, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.as_tensor(c["mu"]).to(dt),
        torch.as_tensor(c["kappa"]).to(dt),
        torch.as_tensor(c["wc"]).to(dt),
    )


@pytest.mark.golden
@pytest.mark.parametrize("variant", ["f32", "f64"])
@pytest.mark.parametrize("source", ["scf", "tface"])
def test_reference_mode_matches_authors(case07, variant, source):
    dt = DTYPES[variant]
    mu, kappa, wc = _inputs(case07, dt)
    out = scf.vmf_loss(mu, kappa, wc, radius=64.0, mode="reference")
    worst = 0.0
    for key in ("losses", "l1", "l2", "l3"):
        assert out[key].dtype == dt
        want = case07[f"{source}__{key}_{variant}"]
        np.testing.assert_allclose(out[key].numpy(), want, rtol=RTOL[variant], atol=0, err_msg=key)
        worst = max(worst, float(np.max(np.abs(out[key].numpy() - want) / np.abs(want))))
    mean_want = float(case07[f"{source}__mean_loss_{variant}"])
    assert abs(float(out["losses"].mean()) - mean_want) <= RTOL[variant] * abs(mean_want)
    print(f"case07 {source} {variant}: max rel err {worst:.3g}")


@pytest.mark.golden
def test_class_centres_and_batch_loss_from_raw_weights(case07):
    c = case07
    w, labels = torch.as_tensor(c["W_unnormalised"]).double(), torch.as_tensor(c["labels"])
    wc = scf.class_centres(w, labels, 64.0)
    np.testing.assert_allclose(wc.numpy(), c["wc"], rtol=0, atol=2e-5)  # wc is stored as float32
    mu, kappa, _ = _inputs(c, torch.float64)
    total, _ = scf.loss(mu, torch.log(kappa), labels, class_weights=w, mode="reference")
    assert math.isclose(float(total), float(c["scf__mean_loss_f64"]), rel_tol=1e-6)


@pytest.mark.golden
def test_stable_mode_differs_from_reference_only_by_the_1e6(case07):
    """The authors' 1e-6 inside log(1e-6 + ive) is the only difference, and it is large below κ ≈ 3500."""
    mu, kappa, wc = _inputs(case07, torch.float64)
    stable = scf.vmf_loss(mu, kappa, wc, mode="stable")["losses"]
    ref = scf.vmf_loss(mu, kappa, wc, mode="reference")["losses"]
    k = kappa.reshape(-1).numpy()
    gap = (stable - ref).reshape(-1).numpy()
    big = k >= 5000  # here ive(255, κ) ≫ float32 rounding, so the gap is −log(1 + 1e-6/ive)
    if big.any():
        ive = np.exp(log_ive(255.0, torch.as_tensor(k[big])).numpy())
        # atol: the reference takes its log in float32 (≈1e-6 absolute at these magnitudes)
        np.testing.assert_allclose(gap[big], -np.log1p(1e-6 / ive), rtol=1e-3, atol=1e-5)
    if (k <= 100).any():
        assert gap[k <= 100].max() < -100  # at κ ≤ 100 the reference has lost hundreds of nats


def _loss_reference_mpmath(mu: np.ndarray, kappa: np.ndarray, wc: np.ndarray, r: float) -> np.ndarray:
    mpmath = pytest.importorskip("mpmath")
    d = mu.shape[1]
    v = d / 2 - 1
    out = []
    with mpmath.workdps(40):
        for m, k, w in zip(mu, kappa.reshape(-1), wc, strict=True):
            k = mpmath.mpf(float(k))
            cos = mpmath.mpf(float(np.dot(m.astype(np.float64), w.astype(np.float64)))) / r
            val = -k * cos - v * mpmath.log(k) + mpmath.log(mpmath.besseli(v, k))
            val += (d / 2) * mpmath.log(2 * mpmath.pi) + d * mpmath.log(r)
            out.append(float(val))
    return np.array(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_loss_matches_high_precision(dtype):
    torch.manual_seed(0)
    mu = F.normalize(torch.randn(8, 512, dtype=torch.float64), dim=1)
    wc = F.normalize(mu + 0.5 * torch.randn(8, 512, dtype=torch.float64), dim=1) * 64.0
    kappa = torch.tensor([1.0, 10.0, 100.0, 700.0, 3000.0, 2e4, 5e4, 1e5], dtype=torch.float64)[:, None]
    want = _loss_reference_mpmath(mu.numpy(), kappa.numpy(), wc.numpy(), 64.0)
    got = scf.vmf_loss(mu.to(dtype), kappa.to(dtype), wc.to(dtype), mode="stable")["losses"].reshape(-1)
    assert got.dtype == dtype
    if dtype == torch.float64:
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    else:  # float32 inputs: the error is the inputs' own rounding, amplified by κ in −κ·cos
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5)


def test_stable_loss_gradcheck_and_finite_extremes():
    torch.manual_seed(1)
    mu = F.normalize(torch.randn(5, 64, dtype=torch.float64), dim=1)
    wc = F.normalize(torch.randn(5, 64, dtype=torch.float64), dim=1) * 64.0
    kappa = torch.tensor([[0.5], [5.0], [80.0], [2e3], [1e5]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: scf.vmf_loss(mu, k, wc)["losses"], (kappa,))


def test_eqn13_properties():
    torch.manual_seed(2)
    d = 512
    a = F.normalize(torch.randn(6, d, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(6, d, dtype=torch.float64), dim=1)
    ka = torch.tensor([1.0, 10.0, 100.0, 1e3, 1e4, 1e5], dtype=torch.float64)
    kb = ka.flip(0)
    s_ab = scf.pair_score(a, ka, b, kb)
    s_ba = scf.pair_score(b, kb, a, ka)
    assert torch.allclose(s_ab, s_ba, rtol=1e-12)  # symmetric
    # increasing in cos θ at fixed κ: rotate b towards a
    orth = F.normalize(b - (a * b).sum(1, keepdim=True) * a, dim=1)
    k = torch.full((1,), 300.0, dtype=torch.float64)
    scores = []
    for cos in np.linspace(-1.0, 1.0, 41):
        direction = cos * a[:1] + math.sqrt(max(0.0, 1 - cos**2)) * orth[:1]
        scores.append(float(scf.pair_score(a[:1], k, direction, k)))
    assert all(np.isfinite(scores)) and np.all(np.diff(scores) > 0)
    # matrix form agrees with the row form
    m = scf.score_matrix(a, ka, b, kb)
    assert torch.allclose(torch.diagonal(m), s_ab, rtol=1e-12)


def test_eqn13_closed_form_against_mpmath():
    mpmath = pytest.importorskip("mpmath")
    d, v = 512, 255
    torch.manual_seed(3)
    a, b = F.normalize(torch.randn(2, d, dtype=torch.float64), dim=1)
    ka, kb = 150.0, 4000.0
    got = float(scf.pair_score(a[None], torch.tensor([ka]), b[None], torch.tensor([kb])))
    cos = float(a @ b)
    with mpmath.workdps(40):

        def log_c(k):
            return v * mpmath.log(k) - (d / 2) * mpmath.log(2 * mpmath.pi) - mpmath.log(mpmath.besseli(v, k))

        kt = mpmath.sqrt(ka**2 + kb**2 + 2 * ka * kb * mpmath.mpf(cos))
        want = float(log_c(mpmath.mpf(ka)) + log_c(mpmath.mpf(kb)) - log_c(kt))
    assert math.isclose(got, want, rel_tol=1e-10)


def test_eqn14_identical_directions_add_kappa():
    mu = F.normalize(torch.randn(1, 32, dtype=torch.float64), dim=1).repeat(3, 1)
    kappa = torch.tensor([[10.0], [200.0], [3.5]], dtype=torch.float64)
    direction, k = scf.fuse(mu, kappa)
    assert torch.allclose(direction, mu[0]) and math.isclose(float(k), 213.5, rel_tol=1e-12)
    # general case: direction of Σκμ, concentration its norm
    mu2 = F.normalize(torch.randn(4, 32, dtype=torch.float64), dim=1)
    k2 = torch.rand(4, 1, dtype=torch.float64) * 100
    s = (k2 * mu2).sum(0)
    d2, n2 = scf.fuse(mu2, k2)
    assert torch.allclose(d2, s / s.norm()) and torch.allclose(n2, s.norm().reshape(1))


def test_head_shapes_and_registry():
    head = build_uncertainty_head("scf", 16, 64, feature_hw=(7, 7))
    head.eval()
    with torch.no_grad():
        out = head(torch.randn(3, 16, 7, 7))
        flat = head(torch.randn(3, 16))  # pre-embedding vectors as a 1×1 map
    assert out.shape == (3, 1) and flat.shape == (3, 1)
    assert bool((out > math.log(1e-6) - 1e-9).all())
    spec = get_method("scf")
    assert spec.uncertainty_name == "kappa"
    k = torch.tensor([[2.0], [4.0]])
    assert torch.equal(spec.uncertainty_scalar(k), torch.tensor([0.5, 0.25]))


def test_head_trains_on_the_stable_loss():
    torch.manual_seed(4)
    n_cls, d = 4, 64
    weights = torch.randn(n_cls, d)
    labels = torch.arange(n_cls).repeat_interleave(4)
    noise = torch.rand(16, 1) * 2  # noisier samples should learn a smaller κ
    mu = F.normalize(F.normalize(weights[labels], dim=1) + noise * torch.randn(16, d) / math.sqrt(d), dim=1)
    features = torch.cat([noise, torch.randn(16, 7)], dim=1)[:, :, None, None].repeat(1, 1, 2, 2)
    head = build_uncertainty_head("scf", 8, d, n_conv=0)
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    first = None
    for _ in range(60):
        total, terms = scf.loss(mu, head(features), labels, class_weights=weights)
        first = first if first is not None else float(total.detach())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(total.detach()) < first and math.isfinite(float(total.detach()))
    head.eval()
    with torch.no_grad():
        kappa = torch.exp(head(features)).reshape(-1)
    clean, noisy = noise.reshape(-1) < 0.5, noise.reshape(-1) > 1.5
    assert float(kappa[clean].mean()) > float(kappa[noisy].mean())


@settings(max_examples=60, deadline=None)
@given(
    log_ka=st.floats(math.log(1e-3), math.log(1e5)),
    log_kb=st.floats(math.log(1e-3), math.log(1e5)),
    cos=st.floats(-1.0, 0.999),
    step=st.floats(1e-3, 0.5),
)
def test_eqn13_symmetric_and_monotone_property(log_ka, log_kb, cos, step):
    """For any κa, κb and cos θ: the score is symmetric and grows when cos θ grows (d = 512)."""
    d = 512
    e0 = torch.zeros(1, d, dtype=torch.float64)
    e0[0, 0] = 1.0

    def unit_at(c: float) -> torch.Tensor:
        v = torch.zeros(1, d, dtype=torch.float64)
        v[0, 0], v[0, 1] = c, math.sqrt(max(0.0, 1.0 - c * c))
        return v

    ka = torch.tensor([math.exp(log_ka)], dtype=torch.float64)
    kb = torch.tensor([math.exp(log_kb)], dtype=torch.float64)
    lo, hi = cos, min(1.0, cos + step)
    s_lo = scf.pair_score(e0, ka, unit_at(lo), kb)
    s_hi = scf.pair_score(e0, ka, unit_at(hi), kb)
    assert torch.isfinite(s_lo).all() and torch.isfinite(s_hi).all()
    assert torch.allclose(s_lo, scf.pair_score(unit_at(lo), kb, e0, ka), rtol=1e-12, atol=1e-12)
    # strictly increasing in exact arithmetic; allow float64 rounding of the ~|score| magnitude
    assert float(s_hi - s_lo) >= -1e-12 * max(1.0, abs(float(s_lo)))


@settings(max_examples=40, deadline=None)
@given(kappas=st.lists(st.floats(1e-3, 1e5), min_size=1, max_size=6))
def test_eqn14_identical_directions_add_kappa_property(kappas):
    mu = F.normalize(torch.arange(1.0, 9.0, dtype=torch.float64), dim=0).repeat(len(kappas), 1)
    k = torch.tensor(kappas, dtype=torch.float64)[:, None]
    direction, total = scf.fuse(mu, k)
    assert math.isclose(float(total), sum(kappas), rel_tol=1e-12)
    assert torch.allclose(direction, mu[0], atol=1e-12)
