"""`facepipe compare`: heads on one backbone + baselines → HTML/markdown/JSON report, MLflow run, and the
page rendered by a real headless Chromium (every figure present, screenshot not blank)."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from facepipe.cli import main
from facepipe.data.shards import write_manifest, write_pair_table
from tests.unit.test_evaluate_model import _bundle, _png

N_PAIRS = 200  # 100 impostor pairs: FMR 0.01 and 0.1 are supported, 0.001 is not (< 1/FMR)
METHODS = ("probface", "pfe", "scf", "dul")
ROWS = {*METHODS, "feature_norm", "random", "true_degradation", "ideal", "random_expected"}


def degraded_shards(shards, n_pairs: int):
    """A decoded-dataset folder whose one pair table, synth_val, has degradation columns."""
    rng = np.random.default_rng(0)
    (shards / "pairs").mkdir(parents=True)
    deg = rng.uniform(0, 1, size=(n_pairs, 2))
    images = [_png(rng, d) for d in deg.reshape(-1)]
    issame = (np.arange(n_pairs) % 2 == 0).tolist()
    extra = {"degradation_a": deg[:, 0], "degradation_b": deg[:, 1]}
    write_pair_table(shards / "pairs" / "synth_val.parquet", images, issame, extra=extra)
    write_manifest(shards, {"color_order": "RGB", "num_classes": 5})
    return shards


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Four heads on the same (seed 0) backbone compared on a pair table with degradation columns."""
    root = tmp_path_factory.mktemp("compare")
    shards = degraded_shards(root / "shards", N_PAIRS)
    models = [str(_bundle(root / m, m)) for m in METHODS]
    out = root / "out"
    db = root / "mlflow.db"
    argv = ["compare", "--models", *models, "--shards", str(shards), "--out", str(out)]
    overrides = [
        "eval.folds=5",
        "eval.batch_size=32",
        "eval.edc_fmr_targets=[0.01, 0.1, 0.001]",
        f"tracking.tracking_uri=sqlite:///{db}",
        f"tracking.artifact_location={root / 'artifacts'}",
    ]
    assert main([*argv, *overrides]) == 0
    return root, shards, out, db


def test_report_has_one_row_per_method_and_baseline(compared):
    _, _, out, _ = compared
    rows = json.loads((out / "comparison.json").read_text())["synth_val"]["rows"]
    by_name = {r["method"]: r for r in rows}
    assert set(by_name) == ROWS
    for name in (*METHODS, "feature_norm", "random", "true_degradation"):
        row = by_name[name]
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["tar_at_far"] <= 1.0
        assert 0.0 <= row["risk_accuracy"] <= 1.0
        for key in ("fmr=0.01", "fmr=0.1"):
            # nothing beats discarding the errors themselves
            assert by_name["ideal"]["pauc"][key] <= row["pauc"][key] + 1e-12
    assert by_name["true_degradation"]["spearman_degradation"] == pytest.approx(1.0)
    assert by_name["ideal"].get("accuracy") is None
    # the heads' score differs from the cosine baselines' and is named in the row
    assert {by_name[m]["score"] for m in METHODS} == {"mls_probface", "mls_pfe", "scf", "dul"}
    # 100 impostor pairs cannot fix a threshold at FMR 0.001: no number, the reason instead
    assert all(row["pauc"]["fmr=0.001"] is None for row in rows)
    assert all(row["pauc"]["fmr=0.01"] is not None for row in rows)
    md = (out / "comparison.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(ROWS) and "EDC pAUC@FMR=0.01" in table[0]
    assert all(line.split(" | ")[-2] == "unsupported" for line in table[1:])  # the FMR=0.001 column
    assert "100 impostor comparisons < 1/FMR = 1000" in md
    assert {p.name for p in (out / "synth_val").iterdir()} == {
        "edc_fmr_0.01.png",
        "edc_fmr_0.1.png",
        "edc_fmr_0.001.png",
        "risk.png",
    }
    edc = json.loads((out / "models" / "dul" / "synth_val" / "metrics.json").read_text())["edc"]
    assert edc["n_impostor"] == N_PAIRS // 2 and list(edc["unsupported"]) == ["fmr=0.001"]
    assert edc["methods"]["dul"]["fmr=0.001"] == {"fmr_target": 0.001, "supported": False, "pauc": None}
    assert edc["methods"]["dul"]["fmr=0.01"]["supported"] and len(edc["methods"]["dul"]["fmr=0.01"]["fnmr"])
    for m in METHODS:
        assert (out / "models" / m / "synth_val" / "metrics.json").is_file()


def test_comparison_run_in_mlflow(compared):
    from mlflow import MlflowClient

    _, _, out, db = compared
    mlc = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = mlc.search_runs(
        [e.experiment_id for e in mlc.search_experiments()], "tags.stage = 'compare'", max_results=5
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    files = {a.path for a in mlc.list_artifacts(run.info.run_id, "comparison")}
    assert {"comparison/comparison.html", "comparison/comparison.md", "comparison/comparison.json"} <= files
    assert "synth_val.probface.pauc_fmr_0.01" in run.data.metrics
    assert "synth_val.dul.pauc_fmr_0.01" in run.data.metrics
    assert not any(k.endswith("pauc_fmr_0.001") for k in run.data.metrics)  # unsupported: no number
    assert run.data.metrics["synth_val.scf.accuracy"] == pytest.approx(
        {r["method"]: r for r in json.loads((out / "comparison.json").read_text())["synth_val"]["rows"]}[
            "scf"
        ]["accuracy"]
    )


def test_heads_on_different_backbones_are_refused(compared, tmp_path, capsys):
    root, shards, _, _ = compared
    other = _bundle(tmp_path / "other", "probface", seed=1)
    argv = [
        "compare",
        "--models",
        str(root / "pfe"),
        str(other),
        "--shards",
        str(shards),
        "--out",
        str(tmp_path),
    ]
    assert main([*argv, "--no-mlflow", "eval.folds=5"]) == 2
    assert "same backbone" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Reusing the features each model's evaluation saved
# ---------------------------------------------------------------------------------------------

SETTINGS = ["eval.folds=5", "eval.batch_size=32", "eval.edc_fmr_targets=[0.01, 0.1, 0.001]"]


@pytest.fixture(scope="module")
def reports(compared, tmp_path_factory):
    """Each head's `facepipe evaluate --model` report on the compared pair table, in METHODS order."""
    root, shards, _, _ = compared
    folders = []
    for method in METHODS:
        report = tmp_path_factory.mktemp("reports") / method
        argv = ["evaluate", "--model", str(root / method), "--shards", str(shards), "--out", str(report)]
        assert main([*argv, *SETTINGS]) == 0
        folders.append(str(report))
    return folders


def _rows(out) -> list[dict]:
    return json.loads((out / "comparison.json").read_text())["synth_val"]["rows"]


def test_compare_reuses_the_features_evaluate_saved(compared, reports, tmp_path, caplog, capsys):
    root, shards, out, _ = compared
    models = [str(root / m) for m in METHODS]
    argv = ["compare", "--models", *models, "--shards", str(shards), "--no-mlflow", *SETTINGS]
    caplog.set_level(logging.INFO, logger="facepipe.eval.compare")
    assert main([*argv, "--out", str(tmp_path / "reused"), "--reports", *reports]) == 0
    assert caplog.text.count(": reused ") == len(METHODS) and ": embedding" not in caplog.text
    assert _rows(tmp_path / "reused") == _rows(out)  # the numbers of embedding every model here
    # each report given for the wrong model: nothing matches, every model is embedded, same numbers
    caplog.clear()
    rotated = [*reports[1:], reports[0]]
    assert main([*argv, "--out", str(tmp_path / "rotated"), "--reports", *rotated]) == 0
    assert caplog.text.count("was made with another model") == len(METHODS)
    assert _rows(tmp_path / "rotated") == _rows(out)
    assert main([*argv, "--out", str(tmp_path / "o"), "--reports", *reports[1:]]) == 2
    assert "one folder per model" in capsys.readouterr().err


def test_saved_features_are_used_only_when_they_match(compared, reports, tmp_path):
    import pyarrow.parquet as pq

    from facepipe.eval.model_features import load_eval_model, saved_pair_features

    root, shards, _, _ = compared
    table = shards / "pairs" / "synth_val.parquet"
    model = load_eval_model(root / "probface")
    found, why = saved_pair_features(reports[0], model, table, flip=True)
    assert found is not None and why.startswith("reused") and found.method == "probface"
    assert found.fold is not None and found.degradation is not None
    assert saved_pair_features(reports[0], model, table, flip=False) == (None, _why(reports[0], "flip"))
    assert saved_pair_features(reports[1], model, table, flip=True) == (None, _why(reports[1], "model"))
    changed = tmp_path / "pairs" / "synth_val.parquet"  # the same pairs, one row fewer
    changed.parent.mkdir()
    pq.write_table(pq.read_table(table).slice(0, N_PAIRS - 1), changed)
    assert saved_pair_features(reports[0], model, changed, flip=True) == (None, _why(reports[0], "table"))
    assert saved_pair_features(tmp_path, model, table, flip=True)[0] is None  # no saved features there


def _why(report: str, what: str) -> str:
    return f"{report}/synth_val/features.npz was made with another {what}"


# ---------------------------------------------------------------------------------------------
# The page in a real browser
# ---------------------------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = "install it with infra/scripts/install-system-deps.sh (Debian package chromium)"


def chromium() -> str:
    """The Chromium binary; skips outside CI when absent, fails under CI=true (CI must render the page)."""
    found = shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium")
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but Chromium is not installed: {INSTALL_HINT}")
    pytest.skip(f"Chromium not installed; {INSTALL_HINT}")


def _run_chromium(tmp_path, name: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"  # fresh profile per run: no state between runs
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def test_page_renders_every_figure_in_headless_chromium(compared, tmp_path):
    _, _, out, _ = compared
    page = out / "comparison.html"
    text = page.read_text()
    assert "<script" not in text and "http" not in text  # static: no scripts, nothing fetched
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(embedded) == 4  # three EDC plots (one an unsupported notice) and the risk plot
    for data in embedded:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"

    # a copy with a load-time probe: did the browser decode each <img> (naturalWidth > 0)?
    probe = tmp_path / "probe.html"
    script = (
        "<script>addEventListener('load',()=>document.body.setAttribute('data-decoded',"
        "Array.from(document.images).map(i=>i.complete&&i.naturalWidth>0?1:0).join('')))</script>"
    )
    probe.write_text(text.replace("</body>", script + "</body>"))
    dom = _run_chromium(tmp_path, "dom", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    decoded = re.search(r'data-decoded="([01]*)"', dom.stdout)
    assert decoded is not None, dom.stdout[:2000]
    assert decoded.group(1) == "1111"
    assert "feature_norm" in dom.stdout and "true_degradation" in dom.stdout

    shot = tmp_path / "page.png"
    res = _run_chromium(tmp_path, "shot", f"--screenshot={shot}", "--window-size=1280,3200", page.as_uri())
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (3200, 1280)
    not_white = (img < 245).any(axis=2)
    assert not_white.mean() > 0.02  # text, table rules and plots, not an empty page
    # the plots' coloured curves: many distinct saturated colours, which text alone does not give
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    assert ((hsv[..., 1] > 80) & (hsv[..., 2] > 60)).sum() > 2000


def test_benchmark_flow_compare_step_parses(tmp_path):
    """The flow's comparison command is one facepipe's own parser accepts."""
    from facepipe.orchestration.settings import FlowSettings
    from flows.evaluate import compare_argv
    from tests.unit.test_flows_wiring import REPO, parses

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    s = FlowSettings(str(tmp_path), "params.yaml", ["eval.folds=5"])
    models = ["models:/facepipe-pfe/1", "models:/facepipe-scf/2"]
    argv = compare_argv(s, models, "data/shards", "reports/c", ["reports/pfe-v1", "reports/scf-v2"])
    assert argv[:4] == ["compare", "--models", "models:/facepipe-pfe/1", "models:/facepipe-scf/2"]
    assert argv[argv.index("--reports") + 1 : argv.index("--reports") + 3] == [
        "reports/pfe-v1",
        "reports/scf-v2",
    ]
    assert parses(argv) and parses(compare_argv(s, models, "data/shards", "reports/c"))


def test_bad_arguments_fail_before_any_work(compared, tmp_path, capsys):
    root, shards, _, _ = compared
    argv = ["compare", "--models", str(root / "pfe"), "--shards", str(shards), "--out", str(tmp_path / "o")]
    assert main([*argv, "--far", "3e-3", "--no-mlflow"]) == 2
    assert "--far must be one of" in capsys.readouterr().err
    assert main([*argv, "--reject", "1.5", "--no-mlflow"]) == 2
    assert "--reject" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "pairs").mkdir(parents=True)
    assert (
        main(["compare", "--models", str(root / "pfe"), "--shards", str(empty), "--out", str(tmp_path)]) == 2
    )
    assert "no pair tables" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
