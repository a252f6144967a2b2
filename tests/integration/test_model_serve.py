"""A registered model served over HTTP: `mlflow models serve` answers tensors, encoded crops and photos.

A tiny untrained model (built directly, no Ray) is registered the way the stages register theirs, with
a small pair table as its run's data: the version gets its operating-point tags and the YuNet model.
`mlflow models serve --env-manager local` then runs as its own process on a free port of 127.0.0.1,
stopped by its pid at the end.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import free_port
from tests.unit.test_verify_embed import DETECTOR, same_and_different, tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def _pair_table(shards: Path, n: int = 40) -> None:
    """`shards/pairs/val.parquet`: n pairs of random 32x32 PNG "crops", half labelled same."""
    import cv2
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    png = [
        cv2.imencode(".png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))[1].tobytes()
        for _ in range(2 * n)
    ]
    (shards / "pairs").mkdir(parents=True)
    (shards / "manifest.json").write_text('{"num_classes": 5}')
    table = pa.table({"image_a": png[0::2], "image_b": png[1::2], "issame": [i % 2 == 0 for i in range(n)]})
    pq.write_table(table, shards / "pairs" / "val.parquet")


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server and the workers it started (its own session), then SIGKILL if needed."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_registered_model_serves_tensors_crops_and_photos(tmp_path, faces_dir, capsys):
    from facepipe import cli, tracking
    from facepipe.config import Config, dump_config
    from facepipe.models.operating import pair_tables_point
    from facepipe.models.photo import FaceModel, PhotoAligner, read_photo
    from facepipe.models.preprocess import to_model_input

    config = Config()
    config.tracking.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config.tracking.artifact_location = str(tmp_path / "artifacts")
    config.tracking.experiment = "serve-test"
    root = tiny_model(tmp_path / "model")
    shards = tmp_path / "shards"
    _pair_table(shards)
    detector = faces_dir / DETECTOR

    run_id = tracking.start_run(config, "probface", shards, "train_uncertainty", "serve")
    registered = tracking.log_and_register(
        config.tracking,
        run_id,
        "probface",
        root / "bundle",
        {"accuracy": 0.5},
        head_dir=root / "head",
        detector_model=detector,
    )
    tracking.end_run(config.tracking, run_id)
    uri = "models:/facepipe-probface@champion"
    assert registered["champion"]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    # mlflow starts `uvicorn` by name: this venv's bin goes first on PATH
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": config.tracking.tracking_uri, "PATH": path}
    env.pop("FACEPIPE_DETECTOR_MODEL", None)  # the registered detector must be the one used
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                MLFLOW,
                "models",
                "serve",
                "-m",
                uri,
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers share the session: stopped together by our pid
        )
    try:
        # while the server starts: the operating point stored with the version is what the model
        # scores on the run's pair table
        tags = tracking.operating_point_tags(uri, config.tracking)
        assert tags["threshold.score"] == "mls_probface" and tags["threshold.n_impostors"] == "20"
        assert {"threshold.far.1e-2", "threshold.far.1e-3", "risk_threshold.reject.1e-1"} <= set(tags)
        model = FaceModel(root)
        assert pair_tables_point(model, [shards / "pairs" / "val.parquet"]) == tags

        # `facepipe verify` on a registered model: its stored threshold, the detector registered with it
        params = tmp_path / "params.yaml"
        params.write_text(dump_config(config))
        (a, b), _ = same_and_different(faces_dir)
        assert cli.main(["verify", str(a), str(b), "--model", uri, "--params", str(params), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["threshold"] == float(tags["threshold.far.1e-3"]) and result["far"] == 1e-3
        assert result["decision"] in ("same", "different", "rejected")

        _wait_ready(url, proc, log)
        aligner = PhotoAligner(detector, model.input_size, 0.6)
        crops = [aligner.align(read_photo(p), str(p)).crop for p in (a, b)]
        local = model.embed(model.to_input(crops))

        # photos with align=true: detection, alignment and embedding on the server
        photos = [base64.b64encode(p.read_bytes()).decode() for p in (a, b)]
        status, body = _post(url + "/invocations", {"inputs": photos, "params": {"align": True}})
        assert status == 200, body
        got = body["predictions"]
        np.testing.assert_allclose(got["embedding"], local["embedding"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got["uncertainty"]).ravel(), local["u"].ravel(), rtol=1e-4)

        # aligned crops as base64 PNG, and the same crops as a normalised tensor
        import cv2

        small = [cv2.resize(c, (32, 32), interpolation=cv2.INTER_AREA) for c in crops]
        pngs = [base64.b64encode(cv2.imencode(".png", c)[1].tobytes()).decode() for c in small]
        tensor = to_model_input(model.to_input(small)).contiguous().numpy()
        status, from_png = _post(url + "/invocations", {"inputs": pngs})
        assert status == 200, from_png
        status, from_tensor = _post(url + "/invocations", {"inputs": tensor.tolist()})
        assert status == 200, from_tensor
        np.testing.assert_allclose(
            from_png["predictions"]["embedding"],
            from_tensor["predictions"]["embedding"],
            rtol=1e-4,
            atol=1e-5,
        )
        expected = model.forward(tensor)[0]
        np.testing.assert_allclose(from_tensor["predictions"]["embedding"], expected, rtol=1e-4, atol=1e-5)

        # bad input: a 400 with the reason, and the server keeps serving
        status, body = _post(url + "/invocations", {"inputs": ["not an image"]})
        assert status == 400 and "base64" in json.dumps(body)
        blank = base64.b64encode(cv2.imencode(".jpg", np.full((200, 200, 3), 120, np.uint8))[1]).decode()
        status, body = _post(url + "/invocations", {"inputs": [blank], "params": {"align": True}})
        assert status == 400 and "no face found" in json.dumps(body)
    finally:
        _stop(proc)
    assert proc.returncode is not None
