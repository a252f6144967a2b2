"""The one `facepipe` command: help works and user errors exit 2 without a traceback."""

import subprocess
import sys

from facepipe.cli import main
from facepipe.errors import DataError


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "facepipe", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "facepipe" in out.stdout


def test_data_error_names_file_and_record():
    err = DataError("bad magic", path="/x/train.rec", record=17)
    assert "/x/train.rec" in str(err) and "17" in str(err)


def test_user_error_exits_2(capsys, monkeypatch):
    import argparse

    from facepipe import cli

    def boom(args):
        raise DataError("truncated", path="a.rec", record=3)

    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(func=boom, command="decode")
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert main([]) == 2
    assert "a.rec" in capsys.readouterr().err
