"""Atomic writes: nothing half-written under the final name, ordinary permissions when done."""

import os
import stat

import pytest

from facepipe.fsutil import atomic_path, clean_stale_temps, sha256_file, write_json_atomic


def test_failed_write_leaves_neither_target_nor_temp(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_success_replaces_atomically_with_umask_permissions(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    old_mask = os.umask(0o022)
    try:
        write_json_atomic(target, {"a": 1})
    finally:
        os.umask(old_mask)
    assert target.read_text().strip().startswith("{")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert len(sha256_file(target)) == 64


def test_clean_stale_temps_removes_only_temps(tmp_path):
    (tmp_path / ".part-00000.parquet.abc.tmp").write_bytes(b"x")
    (tmp_path / "part-00000.parquet").write_bytes(b"y")
    assert clean_stale_temps(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]
