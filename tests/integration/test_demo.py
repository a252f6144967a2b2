"""The main job (`facepipe demo`, what `make demo` runs) at a tiny size: it finishes, registers models
with aliases, prints the summary, stops every service it started, and a second run reuses its work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = [
    "synth.identities=30", "synth.images_per_identity=6", "synth.pairs=100", "synth.workers=1",
    "synth.protocol_subjects=6",
    "decode.workers=1", "train_backbone.epochs=1", "train_backbone.batch_size=32",
    "train_uncertainty.epochs=1", "train_uncertainty.classes_per_batch=8",
    "train_uncertainty.images_per_class=2", "train_uncertainty.batch_size=32",  # DUL: plain batches
    # 50 impostor pairs per table: FMR 0.05 fixes a threshold, 0.001 cannot (< 1/FMR) and is marked so
    "eval.edc_fmr_targets=[0.05, 0.001]",
]  # fmt: skip
METHODS = ("probface", "dul")  # two heads (one the registry's fourth method) keep the tiny run short
ROWS = {*METHODS, "feature_norm", "random", "true_degradation", "ideal", "random_expected"}


def _children_named(workdir: Path) -> list[str]:
    """Processes still running whose command line mentions the demo's folder (services it started)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(workdir) in part for part in proc.info["cmdline"] or []):
                found.append(" ".join(proc.info["cmdline"]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _demo(workdir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "facepipe", "demo", "--workdir", str(workdir)]
    cmd += ["--methods", ",".join(METHODS)]
    for item in TINY:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL)


def test_demo_runs_twice_and_stops_its_services(tmp_path):
    workdir = tmp_path / "demo"
    first = _demo(workdir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    assert "facepipe demo finished" in first.stdout
    assert "facepipe-backbone v1" in first.stdout and "facepipe-probface v1" in first.stdout
    assert "facepipe-dul v1" in first.stdout
    assert "facepipe-backbone v2" in first.stdout  # the fine-tuned backbone (triplets + centre term)
    assert "champion" in first.stdout and "mlflow ui" in first.stdout
    assert "prefect server start" in first.stdout
    summary = json.loads((workdir / "reports" / "demo-summary.json").read_text())
    names = {"facepipe-backbone", "facepipe-probface", "facepipe-dul"}
    assert {m["name"] for m in summary["models"]} == names
    assert summary["data_version"]  # the raw dataset was versioned with DVC
    assert list((workdir / "reports").glob("facepipe-probface-v1/plots/*/roc.png"))
    _check_protocol_reports(workdir, summary)
    assert "    ijb: 1:1 AUC " in first.stdout
    assert "    video (set-to-set, accuracy by fusion): mean " in first.stdout
    _check_comparison_report(workdir, summary, first.stdout)
    _check_work_is_shared(workdir)
    assert _children_named(workdir) == []

    second = _demo(workdir)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    summary = json.loads((workdir / "reports" / "demo-summary.json").read_text())
    stages = summary["stages"]
    # nothing changed: the data and training stages are reused, not redone
    assert all(stages[name] == "up to date" for name in stages if not name.startswith("benchmark")), stages
    _check_comparison_report(workdir, summary, second.stdout)
    assert _children_named(workdir) == []


def _check_work_is_shared(workdir: Path) -> None:
    """Each benchmarked version was scored by one process (pair tables and protocol sets), the heads
    and their backbone ran the backbone once per image table (the embedding cache), and the comparison
    embedded nothing: it took the features the benchmark saved."""
    stages = {p.stem for p in (workdir / ".facepipe" / "stages").glob("benchmark-*.json")}
    assert stages and not {s for s in stages if s.endswith(("-ijb", "-video"))}, stages
    # per backbone version: 2 pair tables + the IJB images + the video frames
    assert len(list((workdir / "data" / "features" / "eval-embeddings").glob("*.npz"))) == 2 * 4
    log = (workdir / ".facepipe" / "logs" / "benchmark-compare.log").read_text()
    assert log.count(": reused ") == len(METHODS) * 2 and ": embedding" not in log, log[-3000:]


def _check_protocol_reports(workdir: Path, summary: dict) -> None:
    """Every benchmarked version has its verification, IJB (1:1 + 1:N) and video reports, named in the
    summary; the fine-tuned backbone (v2) is benchmarked beside the one it started from."""
    benchmark = summary["benchmark"]
    assert {"models:/facepipe-backbone/1", "models:/facepipe-backbone/2"} <= set(benchmark)
    for uri, reports in benchmark.items():
        assert {"metrics", "ijb/metrics", "ijb/identification/metrics", "video/metrics"} <= set(reports), uri
    for folder in ("facepipe-backbone-v1", "facepipe-backbone-v2"):
        report = workdir / "reports" / folder
        one_to_n = json.loads((report / "ijb" / "identification" / "metrics.json").read_text())
        for gallery in ("G1", "G2"):
            assert 0 <= one_to_n["galleries"][gallery]["closed_set"]["rank_1"] <= 1
        assert (report / "ijb" / "identification" / "cmc.png").is_file()
        video = json.loads((report / "video" / "metrics.json").read_text())
        assert 0 <= video["fusions"]["mean"]["accuracy"] <= 1


def _check_comparison_report(workdir: Path, summary: dict, stdout: str) -> None:
    """The heads and the baselines side by side: HTML + markdown named in the summary, one row each."""
    html = Path(summary["comparison_report"])
    assert html == workdir / "reports" / "comparison" / "comparison.html" and html.is_file()
    md = html.with_suffix(".md")
    assert f"Comparison report (heads + baselines, EDC / risk / accuracy): {html}" in stdout
    assert f"markdown table: {md}" in stdout
    tables = json.loads(html.with_name("comparison.json").read_text())
    assert set(tables) == {"synth_val", "synth_hard"}
    for name, table in tables.items():
        rows = {row["method"]: row for row in table["rows"]}
        assert len(table["rows"]) == len(rows) and set(rows) == ROWS, rows
        assert all(row["pauc"]["fmr=0.05"] is not None for row in rows.values())
        assert all(row["pauc"]["fmr=0.001"] is None for row in rows.values())  # unsupported
        assert f"{name} EDC pAUC at FMR=0.05 (lower is better): " in stdout
        section = f"## {name} ({table['n_pairs']} pairs)"
        block = md.read_text().split(section)[1].split("\n## ")[0]
        assert len([line for line in block.splitlines() if line.startswith("| ")]) == 1 + len(ROWS)
        assert "EDC at FMR=0.001: unsupported" in block
    assert "data:image/png;base64," in html.read_text()
