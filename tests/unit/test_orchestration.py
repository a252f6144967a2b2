"""What the flows run, without Prefect: the console's share of a stage's output, and moving `champion`."""

from __future__ import annotations

import sys

import pytest

from facepipe.console import for_console
from facepipe.orchestration.registry import benchmark_score, choose_champion
from facepipe.orchestration.stage_process import StageFailed, run_logged

# lines as a training stage prints them (Ray forwards actor output with a coloured prefix)
STAGE_OUTPUT = [
    "2026/12/06 06:25:23 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
    "\x1b[36m(TrainController pid=5686)\x1b[0m Requesting resources: {'CPU': 1.0} * 2",
    "\x1b[36m(TrainController pid=5686)\x1b[0m Traceback (most recent call last):",
    '\x1b[36m(TrainController pid=5686)\x1b[0m   File "scaling_policy.py", line 66, in send',
    "(RayTrainWorker pid=5886, ip=10.0.0.2) Reporting training result 1: TrainingReport(metrics={...})",
    "\x1b[36m(RayTrainWorker pid=5886)\x1b[0m facepipe train: epoch 1/3  loss 17.47  126 samples/s",
    "/venv/lib/python3.11/site-packages/torch/_subclasses/functional_tensor.py:368: UserWarning: NumPy",
    "  cpu = _conversion_method_template(device=torch.device('cpu'))",
    "2026-12-06 06:24:37,088 INFO facepipe.progress: render train: done, 30 ids in 2.0 s",
    "2026-12-06 06:24:37,090 ERROR ray.train: worker group failed",
    "facepipe train backbone: done",
    "  mlflow run  668dc95f178e47ac827e0ad5e468d5ef",
]


def test_the_console_gets_facepipes_lines_and_errors_not_framework_internals():
    shown = for_console(STAGE_OUTPUT)
    assert shown == [
        "facepipe train: epoch 1/3  loss 17.47  126 samples/s",  # rank 0's line, Ray's prefix gone
        "2026-12-06 06:24:37,088 INFO facepipe.progress: render train: done, 30 ids in 2.0 s",
        "2026-12-06 06:24:37,090 ERROR ray.train: worker group failed",
        "facepipe train backbone: done",
        "  mlflow run  668dc95f178e47ac827e0ad5e468d5ef",  # the summary's indented lines stay
    ]
    assert for_console(STAGE_OUTPUT, everything=True) == STAGE_OUTPUT


def test_a_stage_logs_everything_and_fails_with_its_log(tmp_path):
    shown: list[str] = []
    log = tmp_path / "logs" / "x.log"
    with pytest.raises(StageFailed) as failed:
        run_logged(
            "x", ["decode", str(tmp_path / "missing"), str(tmp_path / "out")], tmp_path, log, shown.append
        )
    assert failed.value.permanent and str(log) in str(failed.value)  # exit 2: a user error, not retried
    assert "error" in log.read_text() and all(line.startswith("x | ") for line in shown)
    run_logged("x", ["--help"], tmp_path, log, shown.append, env={"FACEPIPE_CONSOLE": "all"})
    assert any("usage" in line for line in shown)


def test_benchmark_score_averages_the_pair_tables_that_report_the_metric():
    metrics = {"synth_val": {"accuracy": 0.8}, "synth_hard": {"accuracy": 0.6}, "lfw": {"auc": 0.9}}
    assert benchmark_score(metrics, "accuracy") == pytest.approx(0.7)
    assert benchmark_score(metrics, "tar") is None
    assert benchmark_score({"a": {"accuracy": float("nan")}}, "accuracy") is None


def test_choose_champion_moves_the_alias_to_the_best_benchmarked_version(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlc = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlc.create_registered_model("facepipe-toy")
    for _ in range(3):
        mlc.create_model_version("facepipe-toy", source=str(tmp_path))
    mlc.set_registered_model_alias("facepipe-toy", "champion", "1")

    kept = choose_champion(uri, str(tmp_path), "facepipe-toy", {"1": 0.9, "2": 0.9, "3": None}, "accuracy")
    assert kept["champion"] == "1" and not kept["moved"]  # a tie keeps the current champion
    moved = choose_champion(uri, str(tmp_path), "facepipe-toy", {"1": 0.7, "2": 0.8}, "accuracy")
    assert moved["moved"] and moved["previous"] == "1" and moved["champion"] == "2"
    champion = mlc.get_model_version_by_alias("facepipe-toy", "champion")
    assert str(champion.version) == "2" and champion.tags["benchmark.accuracy"] == "0.8"
    unscored = choose_champion(uri, str(tmp_path), "facepipe-toy", {"3": None}, "accuracy")
    assert unscored["champion"] is None
    assert str(mlc.get_model_version_by_alias("facepipe-toy", "champion").version) == "2"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_framework_output_goes_to_the_log_and_facepipes_lines_to_the_console(tmp_path, capsys, monkeypatch):
    from facepipe.console import framework_output_to

    monkeypatch.delenv("FACEPIPE_CONSOLE", raising=False)
    log = tmp_path / "logs" / "train.log"
    with framework_output_to(log) as path:
        kept = sys.stdout  # e.g. colorama wraps the stream it finds at import and keeps it
        print("\n".join(STAGE_OUTPUT[:6]))
        print("facepipe train backbone: wrote", end="")  # an unfinished line is flushed at the end
    out = capsys.readouterr().out.splitlines()
    assert path == log and out == [
        "facepipe train: epoch 1/3  loss 17.47  126 samples/s",
        "facepipe train backbone: wrote",
    ]
    assert log.read_text().splitlines()[:6] == STAGE_OUTPUT[:6]
    kept.write("after the block\n")  # the log is closed: written through, no "I/O on closed file"
    assert capsys.readouterr().out == "after the block\n"
    monkeypatch.setenv("FACEPIPE_CONSOLE", "all")
    with framework_output_to(log) as path:
        print(STAGE_OUTPUT[1])
    assert path is None and capsys.readouterr().out.strip() == STAGE_OUTPUT[1]
