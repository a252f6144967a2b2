"""PFE: golden case 05 (the authors' numpy score, aggregation and TF loss) and the head's behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facepipe.uncertainty import build_uncertainty_head, get_method, pfe
from tests.fixture_dirs import missing_fixture

DTYPES = {"f32": torch.float32, "f64": torch.float64}
# README case 05 tolerances: scores rtol 1e-10 (f64) / 1e-6 (f32); loss rtol 1e-9 (f64) / 1e-6 (f32)
SCORE_RTOL = {"f32": 1e-6, "f64": 1e-10}
LOSS_RTOL = {"f32": 1e-6, "f64": 1e-9}
# The f32 MLS matrix: rtol 1e-6 OR atol 2e-4 per entry. Each entry is a difference of sums of 512 terms,
# so float32 summation order alone moves an entry of ~23 by ~1e-4 while the loss matches exactly.
MATRIX_ATOL = {"f32": 2e-4, "f64": 0.0}


def assert_matrix_close(got: np.ndarray, want: np.ndarray, variant: str) -> None:
    """Each entry within rtol of the reference, or else within atol (the README's 'or', not their sum)."""
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    allowed = np.maximum(LOSS_RTOL[variant] * np.abs(want.astype(np.float64)), MATRIX_ATOL[variant])
    worst = int(np.argmax(err - allowed))
    assert np.all(err <= allowed), (
        f"{int((err > allowed).sum())} entries outside tolerance; worst at flat index {worst}: "
        f"got {got.flat[worst]!r}, want {want.flat[worst]!r}"
    )


@pytest.fixture(scope="module")
def case05(golden_dir):
    path = golden_dir / "case05_pfe_mls.npz"
    if not path.exists():
        missing_fixture(f"{path} is absent")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _t(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(array).to(dtype)


def _max_rel(got: torch.Tensor, want: np.ndarray) -> float:
    want_t = torch.as_tensor(want, dtype=torch.float64)
    return float(((got.to(torch.float64) - want_t).abs() / want_t.abs()).max())


@pytest.mark.golden
@pytest.mark.parametrize("variant", ["f32", "f64"])
def test_pair_mls_score_matches_authors(case05, variant):
    dt = DTYPES[variant]
    c = case05
    got = pfe.pair_score(
        _t(c["pair_mu1"], dt), _t(c["pair_sigma_sq1"], dt), _t(c["pair_mu2"], dt), _t(c["pair_sigma_sq2"], dt)
    )
    assert got.dtype == dt
    want = c[f"pair_MLS_score_{variant}"]
    np.testing.assert_allclose(got.numpy(), want, rtol=SCORE_RTOL[variant], atol=0)
    print(f"case05 pair_MLS_score {variant}: max rel err {_max_rel(got, want):.3g}")


@pytest.mark.golden
@pytest.mark.parametrize("variant", ["f32", "f64"])
def test_mls_loss_and_matrix_match_authors_tf(case05, variant):
    dt = DTYPES[variant]
    c = case05
    mu, log_s, labels = (
        _t(c["loss_mu"], dt),
        _t(c["loss_log_sigma_sq"], dt),
        torch.as_tensor(c["loss_labels"]),
    )
    total, terms = pfe.loss(mu, log_s, labels)
    want = float(c[f"loss_mls_{variant}"])
    assert abs(float(total) - want) <= LOSS_RTOL[variant] * abs(want)
    print(f"case05 loss_mls {variant}: rel err {abs(float(total) - want) / abs(want):.3g}")
    s = torch.exp(log_s)
    matrix = -pfe.score_matrix(mu, s, mu, s, eps=pfe.LOSS_EPS)
    assert_matrix_close(matrix.numpy(), c[f"loss_negative_MLS_matrix_{variant}"], variant)
    # the loss is the mean of that matrix over same-label off-diagonal entries (ordered pairs)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    assert torch.allclose(matrix[same].mean(), total, rtol=1e-6 if variant == "f32" else 1e-12)


@pytest.mark.golden
def test_min_rule_fusion_matches_authors_aggregate(case05):
    c = case05
    mu, s = _t(c["agg_mu"], torch.float64), _t(c["agg_sigma_sq"], torch.float64)
    mu_t, s_t = pfe.fuse(mu, s, rule="min")
    np.testing.assert_allclose(mu_t.numpy(), c["agg_mu_new_f64"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s_t.numpy(), c["agg_sigma_sq_new_f64"], rtol=1e-12)
    # float32 inputs give the same answer within float32 precision
    mu32, s32 = pfe.fuse(mu.float(), s.float(), rule="min")
    np.testing.assert_allclose(mu32.numpy(), c["agg_mu_new_f64"], rtol=1e-5, atol=1e-6)
    err = float((mu_t - torch.as_tensor(c["agg_mu_new_f64"])).abs().max())
    print(f"case05 aggregate (min rule) f64: max abs err {err:.3g}")


def test_paper_fusion_is_product_of_gaussians():
    torch.manual_seed(0)
    mu = torch.randn(4, 8, dtype=torch.float64)
    s = torch.rand(4, 8, dtype=torch.float64) + 0.1
    mu_t, s_t = pfe.fuse(mu, s)  # paper rule is the default
    prec = (1 / s).sum(0)
    assert torch.allclose(s_t, 1 / prec)
    assert torch.allclose(mu_t, (mu / s).sum(0) / prec)
    # fusing with itself halves σ² and keeps μ
    mu2, s2 = pfe.fuse(torch.cat([mu[:1], mu[:1]]), torch.cat([s[:1], s[:1]]))
    assert torch.allclose(s2, s[0] / 2) and torch.allclose(mu2, mu[0])


def test_fusion_rejects_unknown_rule_and_empty_template():
    with pytest.raises(ValueError, match="rule"):
        pfe.fuse(torch.ones(2, 3), torch.ones(2, 3), rule="max")
    with pytest.raises(ValueError, match="empty template"):
        pfe.fuse(torch.ones(0, 3), torch.ones(0, 3))


def test_score_matrix_matches_pair_score_and_blocks():
    torch.manual_seed(1)
    mu_a, mu_b = torch.randn(7, 16), torch.randn(5, 16)
    s_a, s_b = torch.rand(7, 16) + 0.05, torch.rand(5, 16) + 0.05
    full = pfe.score_matrix(mu_a, s_a, mu_b, s_b)
    tiny_blocks = pfe.score_matrix(mu_a, s_a, mu_b, s_b, max_elements=16)  # one row per block
    assert torch.equal(full, tiny_blocks)
    i, j = torch.meshgrid(torch.arange(7), torch.arange(5), indexing="ij")
    rows = pfe.pair_score(mu_a[i.reshape(-1)], s_a[i.reshape(-1)], mu_b[j.reshape(-1)], s_b[j.reshape(-1)])
    assert torch.allclose(full.reshape(-1), rows, rtol=1e-6)


def test_pair_score_accepts_numpy():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=(3, 4)), rng.uniform(0.1, 1, size=(3, 4))
    got = pfe.pair_score(mu, s, mu[::-1].copy(), s[::-1].copy())
    assert got.shape == (3,) and got.dtype == torch.float64


def test_head_shapes_parameters_and_floor():
    head = build_uncertainty_head("pfe", 32, 16, feature_hw=(3, 3))
    assert isinstance(head, pfe.PFEHead)
    # fc1 (288→256, no bias) + BN(256) + fc2 (256→16) + γ, β
    assert sum(p.numel() for p in head.parameters()) == 288 * 256 + 2 * 256 + 256 * 16 + 2
    out = head(torch.randn(6, 32, 3, 3))
    assert out.shape == (6, 16)
    assert bool((out >= np.log(1e-6) - 1e-6).all())
    # starts near σ² = e^-7, as the authors initialise β
    head.eval()
    with torch.no_grad():
        assert abs(float(head(torch.randn(6, 32, 3, 3)).mean()) + 7.0) < 1.0
    with pytest.raises(ValueError, match="input features"):
        head(torch.randn(2, 31, 3, 3))


def test_loss_trains_the_head_towards_larger_mls():
    torch.manual_seed(2)
    labels = torch.arange(4).repeat_interleave(4)
    centres = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    mu = torch.nn.functional.normalize(centres[labels] + 0.3 * torch.randn(16, 16), dim=1)
    features = torch.randn(16, 8)
    head = build_uncertainty_head("pfe", 8, 16, feature_hw=None)
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    first = None
    for _ in range(30):
        total, terms = pfe.loss(mu, head(features), labels)
        first = first if first is not None else float(total.detach())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(total.detach()) < first
    assert set(terms) == {"mls"}


def test_loss_needs_a_genuine_pair():
    with pytest.raises(ValueError, match="genuine pair"):
        pfe.loss(torch.randn(3, 4), torch.zeros(3, 4), torch.tensor([0, 1, 2]))


def test_registry_entry():
    spec = get_method("PFE")
    assert spec.uncertainty_name == "sigma_sq"
    s = torch.rand(5, 3)
    assert torch.allclose(spec.uncertainty_scalar(s), s.mean(1))
