"""The comparison report's files: PNG figures, a markdown table and one static HTML page.

The HTML page has no scripts and no external resources: the PNGs are embedded as base64 ``data:`` URIs
(the same files are also written beside it), so it opens from a file, a mail or an MLflow artefact view.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from facepipe.eval import metrics as M
from facepipe.eval.compare import CompareSettings, TableComparison
from facepipe.eval.edc_report import fmr_key
from facepipe.fsutil import atomic_path

CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th { max-width: 9em; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: right; }
th { background: #eee; }
td:first-child, td:nth-child(2), th:first-child, th:nth-child(2) { text-align: left; }
figure { display: inline-block; margin: 0.5em; } img { max-width: 100%; border: 1px solid #ddd; }
"""


def _num(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def columns(settings: CompareSettings) -> list[str]:
    reject = f"{100 * settings.reject:g}"
    pauc = [
        f"EDC pAUC@FMR={a:g} (≤{100 * settings.edc.discard_limit:g}% discarded)"
        for a in settings.edc.fmr_targets
    ]
    return [
        "method",
        "kind",
        "accuracy",
        f"TAR@FAR={settings.far:g}",
        f"risk-controlled accuracy ({reject}% rejected)",
        *pauc,
        "Spearman(uncertainty, degradation)",
    ]


def table_cells(comparison: TableComparison, settings: CompareSettings) -> list[list[str]]:
    """The table's rows as strings (a dash where a number does not apply)."""
    out = []
    keys = [fmr_key(a) for a in settings.edc.fmr_targets]
    for row in comparison.rows:
        paucs = ["unsupported" if k in comparison.unsupported else _num(row[M.PAUC].get(k), 5) for k in keys]
        numbers = [_num(row.get(key)) for key in (M.ACCURACY, M.TAR_AT_FAR, M.RISK_AT_REJECT)]
        out.append([row["method"], row["kind"], *numbers, *paucs, _num(row.get(M.SPEARMAN_QUALITY), 3)])
    return out


def markdown(comparisons: list[TableComparison], settings: CompareSettings) -> str:
    """One markdown table per pair table (lower pAUC is better; ideal and random bracket it)."""
    head = columns(settings)
    lines = ["# Uncertainty methods and quality baselines", ""]
    for comp in comparisons:
        lines += [f"## {comp.name} ({comp.n_pairs} pairs)", ""]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
        lines += ["| " + " | ".join(cells) + " |" for cells in table_cells(comp, settings)]
        lines.append("")
        lines += [f"- EDC at {key.upper()}: {why}" for key, why in comp.unsupported.items()]
        lines += [""] if comp.unsupported else []
    lines.append(_notes(settings))
    return "\n".join(lines) + "\n"


def _notes(settings: CompareSettings) -> str:
    return (
        "Accuracy: 10-fold verification accuracy of the method's own score (baselines: cosine). "
        f"EDC (ISO/IEC 29794-1): threshold fixed at each FMR on all pairs, pairs of lowest quality "
        f"(the worse image of the two) discarded first, pAUC = area under FNMR up to "
        f"{100 * settings.edc.discard_limit:g}% discarded (lower is better); comparator: cosine."
    )


def write_figures(
    comparison: TableComparison, out_dir: str | os.PathLike, settings: CompareSettings
) -> list[Path]:
    """One EDC PNG per FMR target (all methods on the same axes) and the risk-controlled accuracy PNG."""
    from facepipe.eval.edc_report import plot_edc_targets
    from facepipe.eval.report import plot_risk

    out = Path(out_dir) / comparison.name
    out.mkdir(parents=True, exist_ok=True)
    detail = ", all methods (cosine comparator)"
    section = comparison.edc_section
    paths = plot_edc_targets(section, comparison.edc, out, comparison.name, settings.edc, detail)
    title = f"{comparison.name}: accuracy vs rejection"
    paths.append(plot_risk(comparison.risk_curves, out / "risk.png", title))
    return paths


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def render_html(
    comparisons: list[TableComparison],
    figures: dict[str, list[Path]],
    settings: CompareSettings,
    title: str = "facepipe: uncertainty methods compared",
) -> str:
    """The whole page: per pair table, the table of numbers then its figures (embedded)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns(settings))
    for comp in comparisons:
        parts.append(f"<h2>{html.escape(comp.name)} ({comp.n_pairs} pairs)</h2>")
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
            for cells in table_cells(comp, settings)
        )
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        parts += [f"<p>EDC at {k.upper()}: {html.escape(why)}</p>" for k, why in comp.unsupported.items()]
        parts += [_img(p, f"{comp.name}: {p.stem}") for p in figures.get(comp.name, [])]
    parts += [f"<p>{html.escape(_notes(settings))}</p>", "</body></html>"]
    return "\n".join(parts) + "\n"


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path
