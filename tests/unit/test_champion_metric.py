"""`champion` of uncertainty heads goes to the better uncertainty (EDC pAUC, lower is better), not to a tie
on the backbone's cosine accuracy; the metric names and directions come from `facepipe.eval.metrics`."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.config import TrackingConfig
from facepipe.eval import metrics as M
from facepipe.eval.edc_report import EdcSettings
from facepipe.eval.features import PairFeatures
from facepipe.eval.pairs import table_report

N_PAIRS, DIM = 400, 32


def _features(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings of pairs whose genuine similarity drops with the images' degradation."""
    issame = np.arange(N_PAIRS) % 2 == 0
    deg = rng.uniform(0.0, 1.0, size=(N_PAIRS, 2))
    a = rng.normal(size=(N_PAIRS, DIM))
    b = rng.normal(size=(N_PAIRS, DIM))
    noise = 3.0 * deg.max(axis=1, keepdims=True)
    b[issame] = a[issame] + noise[issame] * rng.normal(size=(int(issame.sum()), DIM))
    emb = np.stack([a, b], axis=1).reshape(2 * N_PAIRS, DIM)
    return emb, issame, deg.reshape(-1)


def _head_report(emb, issame, deg, sigma_sq, out) -> dict:
    features = PairFeatures(
        embeddings=emb,
        issame=issame,
        uncertainty=sigma_sq.reshape(-1, 1),
        degradation=deg,
        kind="sigma_sq",
        method="probface",
    )
    _, headline, _ = table_report(
        features, out, "synth_val", (0.0, 0.2), 10, EdcSettings(fmr_targets=(0.01,))
    )
    return headline


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    """One backbone's pair features with two heads: σ² that follows the degradation, and σ² that does not."""
    tmp = tmp_path_factory.mktemp("heads")
    rng = np.random.default_rng(7)
    emb, issame, deg = _features(rng)
    good = _head_report(emb, issame, deg, 0.05 + deg, tmp / "good")
    poor = _head_report(emb, issame, deg, 0.05 + rng.uniform(0.0, 1.0, deg.shape), tmp / "poor")
    return good, poor


def test_heads_on_one_backbone_tie_on_accuracy_but_not_on_edc_pauc(two_heads):
    good, poor = two_heads
    assert good[M.ACCURACY] == poor[M.ACCURACY]  # the same backbone: cosine accuracy cannot rank heads
    assert good[M.EDC_FMR] == poor[M.EDC_FMR] == 0.01
    assert good[M.EDC_PAUC] < poor[M.EDC_PAUC]
    assert not M.metric(M.EDC_PAUC).higher_is_better and M.metric(M.ACCURACY).higher_is_better
    assert M.is_better(M.EDC_PAUC, good[M.EDC_PAUC], poor[M.EDC_PAUC])
    assert not M.is_better(M.EDC_PAUC, poor[M.EDC_PAUC], good[M.EDC_PAUC])


def test_champion_metric_fits_the_model_kind():
    from facepipe import tracking

    config = TrackingConfig()
    assert tracking.champion_metric(config, "backbone") == M.BACKBONE_CHAMPION_METRIC == M.ACCURACY
    assert tracking.champion_metric(config, tracking.BACKBONE_MODEL) == M.ACCURACY
    for stage in ("probface", "facepipe-scf"):
        assert tracking.champion_metric(config, stage) == M.HEAD_CHAMPION_METRIC == M.EDC_PAUC
    overridden = TrackingConfig(head_champion_metric="risk_cosine_reject_20")
    assert tracking.champion_metric(overridden, "pfe") == "risk_cosine_reject_20"
    from facepipe.errors import FacepipeError

    with pytest.raises(FacepipeError, match="unknown metric"):
        tracking.champion_metric(TrackingConfig(champion_metric="acuracy"), "backbone")


def _registry(tmp_path, name: str, values: list[float]):
    """A real MLflow SQLite registry holding one version of `name` per champion-metric value."""
    from mlflow import MlflowClient

    from facepipe import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlc = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlc.create_registered_model(name)
    for value in values:
        tags = {tracking.METRIC_TAG + M.EDC_PAUC: str(value)}
        mlc.create_model_version(name, source=str(tmp_path), tags=tags)
    return uri, mlc


def test_registration_moves_champion_to_the_lower_edc_pauc(two_heads, tmp_path):
    from facepipe import tracking

    good, poor = two_heads
    name = tracking.model_name("probface")
    uri, mlc = _registry(tmp_path, name, [poor[M.EDC_PAUC], good[M.EDC_PAUC], poor[M.EDC_PAUC]])
    config = TrackingConfig(tracking_uri=uri)
    assert tracking.promote(config, name, "1", poor[M.EDC_PAUC])  # the first version is the champion
    assert tracking.promote(config, name, "2", good[M.EDC_PAUC])  # lower pAUC: better uncertainty wins
    assert not tracking.promote(config, name, "3", poor[M.EDC_PAUC])  # higher pAUC stays challenger
    assert str(mlc.get_model_version_by_alias(name, tracking.CHAMPION).version) == "2"
    assert str(mlc.get_model_version_by_alias(name, tracking.CHALLENGER).version) == "3"


def test_benchmark_gives_champion_to_the_lower_edc_pauc(two_heads, tmp_path):
    from facepipe.orchestration.registry import benchmark_score, choose_champion

    good, poor = two_heads
    uri, mlc = _registry(tmp_path, "facepipe-probface", [1.0, 1.0])
    mlc.set_registered_model_alias("facepipe-probface", "champion", "1")
    reports = {"1": {"synth_val": poor}, "2": {"synth_val": good}}  # metrics.json: table -> headline
    scores = {v: benchmark_score(r, M.EDC_PAUC) for v, r in reports.items()}
    assert scores == {"1": poor[M.EDC_PAUC], "2": good[M.EDC_PAUC]}
    moved = choose_champion(uri, str(tmp_path), "facepipe-probface", scores, M.EDC_PAUC)
    assert moved["moved"] and moved["champion"] == "2"
    # on a higher-is-better metric the same numbers would pick the other version
    back = choose_champion(uri, str(tmp_path), "facepipe-probface", scores, M.ACCURACY)
    assert back["champion"] == "1"


def test_stage_metrics_are_the_table_headlines_and_their_means():
    summary = {
        "a": {M.N_PAIRS: 10, M.ACCURACY: 0.8, M.risk_accuracy(M.COSINE, 0.3): 0.9, M.EDC_PAUC: 0.1},
        "b": {M.N_PAIRS: 20, M.ACCURACY: 0.6, M.EDC_PAUC: 0.3},
    }
    flat = M.stage_metrics(summary)
    assert flat[M.table_key("a", M.ACCURACY)] == 0.8 and flat[M.table_key("b", M.N_PAIRS)] == 20
    assert flat[M.ACCURACY] == pytest.approx(0.7) and flat[M.EDC_PAUC] == pytest.approx(0.2)
    assert M.N_PAIRS not in flat  # a count has no run-level mean
    assert flat["val/a/risk_acc_reject_30"] == flat["val/a/risk_cosine_reject_30"] == 0.9  # legacy name kept
    for key in flat:
        M.metric(key)  # every logged key is a defined metric


def test_metric_names_resolve_and_unknown_ones_fail():
    assert M.metric("val/synth_val/mls_probface_accuracy").higher_is_better
    assert M.metric("heavily_degraded_accuracy").meaning.endswith("heavily_degraded pairs")
    assert not M.metric("clean_std").higher_is_better
    with pytest.raises(ValueError, match="unknown metric"):
        M.metric("accuracy_of_something")
