"""The loader's streaming: batches as before, each row group read once per epoch, bounded memory."""

from __future__ import annotations

import collections
import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest

from facepipe.data import loader_read
from facepipe.data.loader import ShardLoader
from facepipe.errors import DataError
from tests.unit.test_loader import write_shards

# sha256 of every batch (images, labels, index) of `_digest` as the loader gave them before the
# read-ahead (feeder thread and per-process row-group cache): the same seed must keep giving them
BEFORE = "e80b189fe21b64e1981c950166bf543274c540bb01935533a8c598c56cacf674"


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    cases = [
        {"batch_size": 12, "seed": 3},
        {"batch_size": 10, "seed": 1, "color_order": "BGR", "input_size": (8, 8), "window_rows": 30},
        {"batch_size": 8, "seed": 2, "world_size": 3, "rank": 2, "shuffle": False},
    ]
    for case in cases:
        kwargs = {"input_size": (16, 16)} | case
        with ShardLoader(paths, **kwargs) as loader:
            for epoch, start in ((0, 0), (1, 3)):
                for batch in loader.epoch(epoch, start_batch=start):
                    h.update(batch.images.numpy().tobytes())
                    h.update(batch.labels.numpy().tobytes())
                    h.update(str(batch.index).encode())
    return h.hexdigest()


def test_same_batches_as_before_for_the_same_seed(tmp_path):
    assert _digest(write_shards(tmp_path)) == BEFORE


def test_each_row_group_is_read_once_per_epoch(tmp_path, monkeypatch):
    """Every epoch's reader reads each group once, the next epoch's included: it starts while an
    epoch's last batches decode (so its reads overlap that epoch) and the next `epoch()` takes it."""
    paths = write_shards(tmp_path, n_shards=4, rows=40, row_group=10)
    by_reader: dict[threading.Thread, list] = collections.defaultdict(list)
    real = loader_read.read_group

    def counting(handle, path, row_group):
        by_reader[threading.current_thread()].append((path, row_group))
        return real(handle, path, row_group)

    monkeypatch.setattr(loader_read, "read_group", counting)
    with ShardLoader(paths, batch_size=8, input_size=(16, 16), window_rows=24) as loader:
        every = sorted((u.path, u.row_group) for u in loader.units)
        for epoch in range(3):
            batches = list(loader.epoch(epoch))
            assert len(batches) == len(loader)
            assert loader._next_reads is not None and loader._next_reads[0] == epoch + 1
        early = loader._next_reads[1]
    assert not early._thread.is_alive()  # close() stops the reader of the epoch that never came
    assert len(by_reader) == 4
    readers = list(by_reader.values())
    assert all(sorted(reads) == every for reads in readers[:3])


def test_an_early_reader_is_used_only_by_the_epoch_it_was_started_for(tmp_path):
    paths = write_shards(tmp_path, n_shards=2, rows=40, row_group=10)
    with ShardLoader(paths, batch_size=8, input_size=(16, 16), window_rows=24) as fresh:
        expected = {e: [b.labels.tolist() for b in fresh.epoch(e, start)] for e, start in ((1, 0), (2, 3))}
    with ShardLoader(paths, batch_size=8, input_size=(16, 16), window_rows=24) as loader:
        list(loader.epoch(0))
        early = loader._next_reads[1]
        assert [b.labels.tolist() for b in loader.epoch(1)] == expected[1]  # took the early reader
        assert loader._next_reads[1] is not early
        stale = loader._next_reads[1]  # for epoch 2 from its start; a resume at batch 3 reads anew
        assert [b.labels.tolist() for b in loader.epoch(2, start_batch=3)] == expected[2]
        assert not stale._thread.is_alive()


def _peak_held(paths: list[Path], monkeypatch) -> int:
    peak = [0]
    real_get = loader_read.ReadAhead.get

    def get(self, unit):
        peak[0] = max(peak[0], self.held())
        return real_get(self, unit)

    monkeypatch.setattr(loader_read.ReadAhead, "get", get)
    with ShardLoader(paths, batch_size=8, input_size=(16, 16), window_rows=16, prefetch=2) as loader:
        for _ in loader.epoch(0):
            pass
    return peak[0]


def test_row_groups_in_memory_do_not_grow_with_the_dataset(tmp_path, monkeypatch):
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    small = _peak_held(write_shards(tmp_path / "small", n_shards=2, rows=80, row_group=8), monkeypatch)
    large = _peak_held(write_shards(tmp_path / "large", n_shards=16, rows=80, row_group=8), monkeypatch)
    # of 20 and 160 row groups: those of the batches in flight plus a window (16 rows) ahead, each
    # batch's rows spanning 2 or 3 groups of its window; how many depends on timing, not on the size
    assert 0 < small <= 16 and 0 < large <= 16


def test_a_failed_read_reaches_the_consumer_and_no_thread_is_left(tmp_path, monkeypatch):
    paths = write_shards(tmp_path)

    def broken(handle, path, row_group):
        raise DataError("cannot read row group", path=path)

    monkeypatch.setattr(loader_read, "read_group", broken)
    with (
        ShardLoader(paths, batch_size=8, input_size=(16, 16)) as loader,
        pytest.raises(DataError),
    ):
        list(loader.epoch(0))
    assert not any(t.name == "facepipe-reader" for t in threading.enumerate())


def test_stopping_early_stops_the_reader(tmp_path):
    with ShardLoader(write_shards(tmp_path), batch_size=4, input_size=(16, 16), window_rows=8) as loader:
        for batch in loader.epoch(0):
            assert batch.images.shape[0] == 4
            break
    assert not any(t.name == "facepipe-reader" for t in threading.enumerate())


def test_read_schedule_follows_first_use():
    from facepipe.data.loader_plan import read_schedule

    unit_idx = np.array([2, 2, 1, 2, 1, 1, 0, 0])  # batches of 2: unit 2 first, then 1, then 0
    order, uses = read_schedule(unit_idx, 2)
    assert order == [(2, 0), (1, 1), (0, 3)]
    assert uses == {0: 1, 1: 2, 2: 2}


def test_resuming_at_the_end_of_an_epoch_yields_nothing(tmp_path):
    with ShardLoader(write_shards(tmp_path), batch_size=8, input_size=(16, 16)) as loader:
        assert list(loader.epoch(0, start_batch=len(loader))) == []
        assert [b.index for b in loader.epoch(0, start_batch=len(loader) - 1)] == [len(loader) - 1]
