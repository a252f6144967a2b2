"""A real S3-protocol endpoint for tests: `moto_server` as its own process on 127.0.0.1.

`s3_server` (session) starts it on a free port and stops it by pid; `s3_bucket` creates a fresh
bucket and points the standard AWS variables at the server for one test, giving `s3://<bucket>`.
Import both into a test module (`from tests.s3_server import s3_bucket, s3_server  # noqa: F401`).
"""

from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MOTO = str(Path(sys.executable).with_name("moto_server"))


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen

    def env(self) -> dict[str, str]:
        """The standard AWS variables for this server (dummy keys: moto accepts any)."""
        return {
            "AWS_ACCESS_KEY_ID": "facepipe-test",
            "AWS_SECRET_ACCESS_KEY": "facepipe-test-secret",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def create_bucket(self, name: str) -> None:
        import boto3

        env = self.env()
        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3_server(log: Path, timeout: float = 30.0) -> S3Server:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    server = S3Server(endpoint, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return server
        except urllib.error.HTTPError:  # an S3 error document: the server answers
            return server
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout:.0f} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch) -> str:
    """`s3://<fresh bucket>` with the AWS variables set for this test (restored after it)."""
    name = f"facepipe-{secrets.token_hex(4)}"
    s3_server.create_bucket(name)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://{name}"
