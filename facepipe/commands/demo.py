"""`facepipe demo`: the main job — the whole pipeline on a generated sample dataset, on this machine.

It brings up what a cluster would provide, each started here and stopped again at the end: a Prefect
server on 127.0.0.1 with SQLite, a local Ray head, MLflow on SQLite and a DVC local remote. Then it runs
the `pipeline` flow (synth → DVC-version → decode → backbone → uncertainty heads → fine-tune → benchmark →
register) as a child process, so facepipe itself never imports Prefect, and prints a summary. The heads
are every registered uncertainty method (PFE, ProbFace, SCF, DUL) unless `--methods` names some; the
benchmark compares them with the quality baselines (`facepipe compare`), and the summary names that
report (comparison.html and comparison.md) with each row's EDC pAUC.

Running it again in the same folder reuses what is up to date (the flow's stages check their outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from facepipe.errors import FacepipeError

# Sized so the whole job fits in 15 minutes on 2 CPU cores; `--set key=value` changes any of them.
# - The backbone trains to a time budget (its rate anneals against it) and is verified once, at the end:
#   verifying after every epoch re-embeds the pair tables (13 s of a ~50 s epoch on 2 busy cores), and
#   the late epochs add little (val acc 0.738 after 2 of 6 epochs, 0.745 after a 5-minute budget).
# - Every stage embeds the pair tables at least once (the backbone's ROC, each head's evaluation, the
#   benchmark): 800 pairs a table keep 400 impostor pairs, enough for the EDC at FMR 1e-2.
# - The fine-tune stage runs 40 of its steps: enough to show it, register v2 and benchmark it.
DEMO_OVERRIDES = [
    "synth.identities=500",
    "synth.images_per_identity=12",
    "synth.pairs=800",
    "train_backbone.max_minutes=2.5",
    "train_backbone.epochs=12",
    "train_backbone.verify_every_epoch=false",
    "train_uncertainty.epochs=3",
    "finetune.max_steps=40",
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on a generated sample dataset (local Prefect, Ray, MLflow, DVC)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", default="demo", help="where data, runs, reports and services live")
    parser.add_argument(
        "--config", "--params", dest="params", metavar="FILE", default=None,
        help="params.yaml to start from (default: the repo's); section.key=value on the line as --set",
    )  # fmt: skip
    parser.add_argument(
        "--methods",
        default=None,
        help="uncertainty heads to train and compare (comma-separated; default: every registered method)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a parameter (repeatable), applied after the demo's own sizes",
    )  # fmt: skip
    parser.add_argument("--cpus", type=int, default=None, help="CPUs for the local Ray (default: all usable)")
    parser.set_defaults(func=run)


def _repo_root() -> Path:
    """The checkout that holds `flows/` beside the `facepipe` package (an editable install)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "flows" / "pipeline.py").is_file():
        raise FacepipeError(f"the demo needs the Prefect flows in {root / 'flows'}; run it from a checkout")
    return root


def _embedding_cache(workdir: Path, params: Path, overrides: list[str]) -> str:
    """`eval.embedding_cache=<paths.features>/eval-embeddings` of the flow's configuration (where the
    benchmark flow keeps it), for every stage the flow starts."""
    from facepipe.eval.embed_cache import FOLDER
    from facepipe.orchestration.settings import FlowSettings

    features = FlowSettings(str(workdir), str(params), overrides).config.paths.features
    return f"eval.embedding_cache={Path(features) / FOLDER}"


def _terminate_as_exit(signum: int, _frame: object) -> None:
    # A plain SIGTERM would skip the `finally` that stops the services this command started.
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    from facepipe import services
    from facepipe.cores import available_cores

    repo = _repo_root()
    cpus = args.cpus or available_cores()  # a container's CPU quota, not the node's core count
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    params = workdir / "params.yaml"
    source_params = Path(args.params) if args.params else repo / "params.yaml"
    if not params.exists():
        shutil.copyfile(source_params, params)
    # None: the flow trains every method of the uncertainty registry (PFE, ProbFace, SCF, DUL, …)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    mlflow = services.mlflow_local(workdir / "mlflow")
    overrides = [
        *DEMO_OVERRIDES,
        # two single-threaded DDP workers train ~35% faster than one worker with two threads on 2 cores
        f"train_backbone.scaling.num_workers={min(2, cpus)}",
        f"tracking.tracking_uri={mlflow['tracking_uri']}",
        *args.overrides,
    ]
    # every evaluation (the heads' end-of-stage ones, the benchmark, compare) shares one cache of the
    # backbone's outputs: the four heads and the backbone they sit on embed each image once
    overrides.append(_embedding_cache(workdir, params, overrides))

    signal.signal(signal.SIGTERM, _terminate_as_exit)
    started = time.monotonic()
    handles = []
    try:
        _say("starting a Prefect server on 127.0.0.1 (SQLite)")
        prefect = services.start_prefect_server(workdir / "prefect")
        handles.append(prefect)
        _say(f"starting a local Ray head ({cpus} CPUs)")
        ray = services.start_ray_head(num_cpus=cpus)
        handles.append(ray)
        _say("preparing the DVC project and its local remote")
        services.ensure_dvc_repo(workdir, workdir / "dvc-remote")

        env = {
            **prefect["env"],
            **ray["env"],
            "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
            # Ray Train only collects worker reports every health-check interval (2 s by default)
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        }
        summary_path = workdir / "reports" / "demo-summary.json"
        cmd = [
            sys.executable, "-m", "flows.pipeline", "--workdir", str(workdir), "--params", str(params),
            "--ray-address", ray["address"], "--summary-json", str(summary_path),
        ]  # fmt: skip
        if methods is not None:
            cmd += ["--methods", ",".join(methods)]
        for item in overrides:
            cmd += ["--set", item]
        _say(f"running the pipeline flow (Prefect UI: {prefect['ui_url']})")
        log_path = workdir / "pipeline.log"
        code = _run_logged(cmd, env, repo, log_path)
        if code != 0:
            raise FacepipeError(f"the pipeline flow failed (exit {code}); its log: {log_path}")
        summary = json.loads(summary_path.read_text())
        summary.setdefault("summary_path", str(summary_path))
    finally:
        for handle in reversed(handles):
            handle.stop()
    print(_format_summary(summary, workdir, mlflow, time.monotonic() - started))
    return 0


def _run_logged(cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> int:
    """Run the flow, echoing its log lines (progress) to stderr and keeping them in `log_path`."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            sys.stderr.write(line)
        return proc.wait()


def _say(message: str) -> None:
    print(f"[facepipe demo] {message}", file=sys.stderr, flush=True)


def _format_summary(summary: dict, workdir: Path, mlflow, seconds: float) -> str:
    lines = [f"facepipe demo finished in {seconds / 60:.1f} min — everything is under {workdir}", ""]
    lines.append("Models registered (MLflow):")
    for model in summary.get("models", []):
        aliases = ", ".join(model.get("aliases") or []) or "no alias"
        lines.append(f"  {model['name']} v{model['version']}  [{aliases}]")
    lines.append("")
    lines.append("Benchmark (10-fold verification on the generated pair sets; IJB 1:1 + 1:N and video sets):")
    lines.extend(_benchmark_lines(summary.get("reports", [])))
    lines.append("")
    lines.append(f"Reports (metrics JSON + PNG plots): {', '.join(summary.get('reports', [])) or '-'}")
    lines.extend(_comparison_lines(summary.get("comparison_report")))
    lines.append(f"Pipeline summary: {summary.get('summary_path')}")
    lines.append(f"Data version (DVC md5): {summary.get('data_version')}")
    lines.append("")
    lines.append("The services were stopped. To browse the results:")
    lines.append(f"  MLflow UI:  .venv/bin/{mlflow['ui_command']}")
    lines.append(
        f"  Prefect UI: PREFECT_HOME={workdir / 'prefect'} PREFECT_API_DATABASE_CONNECTION_URL="
        f"sqlite+aiosqlite:///{workdir / 'prefect' / 'prefect.db'} .venv/bin/prefect server start"
    )
    lines.append("Run `make demo` again: finished stages are reused.")
    return "\n".join(lines)


def _comparison_lines(report: str | None) -> list[str]:
    """Where the comparison report is (HTML and markdown) and each row's headline pAUC."""
    if not report or not Path(report).is_file():
        return ["Comparison report: - (not written; see the benchmark-compare stage in the log)"]
    html = Path(report)
    lines = [
        f"Comparison report (heads + baselines, EDC / risk / accuracy): {html}",
        f"  markdown table: {html.with_suffix('.md')}",
    ]
    rows_path = html.with_name("comparison.json")
    tables = json.loads(rows_path.read_text()) if rows_path.is_file() else {}
    for table, comp in tables.items():
        # an FMR target the pairs cannot support has no pAUC (None) in every row
        keys = [k for k, v in comp["rows"][0]["pauc"].items() if v is not None]
        if not keys:
            lines.append(f"  {table}: no EDC FMR target is supported by its {comp['n_pairs']} pairs")
            continue
        cells = ", ".join(f"{row['method']} {row['pauc'][keys[0]]:.4f}" for row in comp["rows"])
        lines.append(f"  {table} EDC pAUC at {keys[0].upper()} (lower is better): {cells}")
    return lines


def _benchmark_lines(report_dirs: list[str]) -> list[str]:
    """One line per model and pair set: accuracy, clean vs degraded, uncertainty quality, risk control."""
    lines = []
    for report in report_dirs:
        lines.append(f"  {Path(report).name}")
        for metrics_path in sorted(Path(report).glob("*/metrics.json")):
            m = json.loads(metrics_path.read_text())
            if m.get("name") in ("ijb", "video"):
                lines.append(f"    {_protocol_line(m, metrics_path.parent)}")
                continue
            acc = m.get("insightface", {})
            parts = [f"acc {acc.get('accuracy', float('nan')):.3f}±{acc.get('std', float('nan')):.3f}"]
            deg = m.get("degradation") or {}
            if "clean_accuracy" in deg:
                bands = [f"clean {deg['clean_accuracy']:.3f}"]
                bands += [
                    f"{band.replace('_', ' ')} {deg[band + '_accuracy']:.3f}"
                    for band in ("degraded", "heavily_degraded")
                    if band + "_accuracy" in deg
                ]
                parts.append(" / ".join(bands))
            if deg.get("spearman_uncertainty_degradation") is not None:
                parts.append(f"spearman(unc, degradation) {deg['spearman_uncertainty_degradation']:.2f}")
            for score, risk in (m.get("risk") or {}).items():
                if score != "cosine" and risk.get("accuracy"):
                    rates, accs = risk["rejection_rates"], risk["accuracy"]
                    parts.append(f"{score} {accs[0]:.3f}→{accs[-1]:.3f} rejecting {rates[-1]:.0%}")
            lines.append(f"    {m.get('name', metrics_path.parent.name)}: " + "; ".join(parts))
    return lines or ["  (no benchmark reports)"]


def _protocol_line(m: dict, folder: Path) -> str:
    """IJB: 1:1 AUC and TAR at FAR 1e-3, 1:N rank-1 and TPIR at FPIR 0.1 per gallery; video: each fusion's
    accuracy. Names the report folder."""
    if m["name"] == "video":
        fusions = ", ".join(f"{name} {f['accuracy']:.3f}" for name, f in m.get("fusions", {}).items())
        return f"video (set-to-set, accuracy by fusion): {fusions}  [{folder}]"
    parts = [f"1:1 AUC {m.get('auc', float('nan')):.3f}"]
    tar = (m.get("tar_at_far_nearest") or {}).get("1e-03")
    if tar is not None:
        parts.append(f"TAR@FAR=1e-3 {tar:.3f}")
    one_to_n = folder / "identification" / "metrics.json"
    if one_to_n.is_file():
        for name, gallery in json.loads(one_to_n.read_text()).get("galleries", {}).items():
            tpir = (gallery.get("open_set", {}).get("1e-01") or {}).get("tpir")
            rank1 = gallery["closed_set"].get("rank_1", float("nan"))
            parts.append(
                f"{name} rank-1 {rank1:.3f}" + (f", TPIR@FPIR=0.1 {tpir:.3f}" if tpir is not None else "")
            )
    return f"ijb: {'; '.join(parts)}  [{folder}]"
