"""`facepipe demo`'s defaults and printed summary: every registered head, and the comparison report named."""

from __future__ import annotations

import argparse
import json

from facepipe.commands import demo


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    return parser.parse_args(["demo", *argv])


def test_demo_trains_and_compares_every_registered_head_by_default():
    from facepipe.uncertainty.registry import method_names
    from flows.train import HEAD_FLOWS

    # no --methods: the pipeline flow gets none and trains its default, one flow per registered method
    assert _parse([]).methods is None
    assert list(HEAD_FLOWS) == method_names() and {"pfe", "probface", "scf", "dul"} <= set(HEAD_FLOWS)
    assert _parse(["--methods", "probface,dul"]).methods == "probface,dul"


def _summary(tmp_path, comparison_report: str | None) -> str:
    summary = {"models": [], "reports": [], "comparison_report": comparison_report, "summary_path": "s.json"}
    return demo._format_summary(summary, tmp_path, {"ui_command": "mlflow ui"}, 60.0)


def test_summary_names_the_comparison_report_and_each_rows_pauc(tmp_path):
    out = tmp_path / "reports" / "comparison"
    out.mkdir(parents=True)
    (out / "comparison.html").write_text("<html></html>")
    (out / "comparison.md").write_text("| method |\n")
    rows = [
        {"method": "dul", "pauc": {"fmr=0.01": 0.0123, "fmr=0.001": None}},
        {"method": "random_expected", "pauc": {"fmr=0.01": 0.0456, "fmr=0.001": None}},
    ]
    small = [{"method": "dul", "pauc": {"fmr=0.01": None, "fmr=0.001": None}}]
    tables = {"synth_val": {"n_pairs": 1200, "rows": rows}, "synth_hard": {"n_pairs": 40, "rows": small}}
    (out / "comparison.json").write_text(json.dumps(tables))
    text = _summary(tmp_path, str(out / "comparison.html"))
    assert f"Comparison report (heads + baselines, EDC / risk / accuracy): {out / 'comparison.html'}" in text
    assert f"  markdown table: {out / 'comparison.md'}" in text
    # the first FMR target the pairs support; none supported on a table that small
    assert "synth_val EDC pAUC at FMR=0.01 (lower is better): dul 0.0123, random_expected 0.0456" in text
    assert "synth_hard: no EDC FMR target is supported by its 40 pairs" in text


def test_summary_says_when_there_is_no_comparison_report(tmp_path):
    for report in (None, str(tmp_path / "missing" / "comparison.html")):
        assert "Comparison report: - (not written" in _summary(tmp_path, report)
