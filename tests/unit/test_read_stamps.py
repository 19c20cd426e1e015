"""Reads served from SDK caches count as use: the epoch table's reads file, stamped by
readers (``EpochReader.mark_read``) and read by the daemon (``read_slots``, then a touch of
each stamped artifact on the daemon's tick and before any admission)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tensorcast_ray.daemon.local_store import LocalStore

from tensorcast_ray._epochs import EpochReader, EpochTable
from tests.unit.test_local_store import MiB, begin, make_store, write


def test_read_slots_answers_each_stamped_slot_once(tmp_path: Path) -> None:
    table = EpochTable(str(tmp_path), "t-epochs", 2048)
    reader = EpochReader(str(tmp_path), "t-epochs", 2048)
    try:
        assert table.read_slots() == []
        for slot in (3, 1500, 3):
            reader.mark_read(slot)
        reader.mark_read(5000)  # outside the table: ignored
        assert table.read_slots() == [1500, 3], "least recently read first"
        assert table.read_slots() == []
        reader.mark_read(1500)
        assert table.read_slots() == [1500]
    finally:
        reader.close()
        table.close(unlink=True)
    assert not os.listdir(tmp_path), "the table and its reads file are removed"


@pytest.fixture
def small(tmp_path: Path) -> Iterator[LocalStore]:
    s = make_store(tmp_path, stable_dram_capacity_bytes=3 * MiB)
    s.bind_session_pid("s1", os.getpid(), s.hostname, pid_verified=True)
    yield s
    s.close(unlink=True)


def test_a_cached_read_protects_an_entry_from_lru_eviction(small: LocalStore) -> None:
    for key, fill in (("a:v1", 1), ("b:v1", 2)):
        write(small, begin(small, key, MiB, []), fill)
    infos = {k: small.rpc_Lookup(_lookup(k), "") for k in ("a:v1", "b:v1")}  # b is newer
    reader = EpochReader(small.shm_dir, small.epoch_segment, small.epoch_slots)
    try:
        reader.mark_read(infos["a:v1"].epoch_slot)  # a read from a process cache, no RPC
        write(small, begin(small, "c:v1", 2 * MiB, []), 3)  # 4 MiB > 3: one must go
    finally:
        reader.close()
    keys = small.rpc_ListKeys(_list(), "").keys
    assert list(keys) == ["a:v1", "c:v1"]


def _lookup(key: str):  # type: ignore[no-untyped-def]
    from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

    return daemon_pb2.LookupRequest(key=key)


def _list():  # type: ignore[no-untyped-def]
    from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

    return daemon_pb2.ListKeysRequest()


def test_an_adopted_table_keeps_the_reads_file_readers_still_map(tmp_path: Path) -> None:
    """A daemon restart: an SDK process serving only cache hits never re-attaches, so its
    stamps must land in the file the new instance reads."""
    first = EpochTable(str(tmp_path), "t-epochs", 64)
    slot, _ = first.alloc()
    reader = EpochReader(str(tmp_path), "t-epochs", 64)
    try:
        reader.mark_read(slot)
        first.close(unlink=False)
        second = EpochTable(str(tmp_path), "t-epochs", 64, adopt=True)
        try:
            assert second.read_slots() == [], "stamps from before the restart are not news"
            reader.mark_read(slot)
            assert second.read_slots() == [slot]
        finally:
            second.close(unlink=True)
    finally:
        reader.close()


def test_a_reads_file_of_the_wrong_size_is_replaced_on_adopt(tmp_path: Path) -> None:
    first = EpochTable(str(tmp_path), "t-epochs", 64)
    first.close(unlink=False)
    os.truncate(tmp_path / "t-epochs.reads", 8)
    second = EpochTable(str(tmp_path), "t-epochs", 64, adopt=True)
    reader = EpochReader(str(tmp_path), "t-epochs", 64)
    try:
        assert os.path.getsize(tmp_path / "t-epochs.reads") == 64 * 8
        reader.mark_read(63)
        assert second.read_slots() == [63]
    finally:
        reader.close()
        second.close(unlink=True)


def test_a_put_that_fits_leaves_the_reads_file_to_the_tick(small: LocalStore) -> None:
    """Comparing the reads file costs every put; only an admission that may evict pays it."""
    write(small, begin(small, "a:v1", MiB, []), 1)
    slot = small.rpc_Lookup(_lookup("a:v1"), "").epoch_slot
    reader = EpochReader(small.shm_dir, small.epoch_segment, small.epoch_slots)
    try:
        reader.mark_read(slot)
        write(small, begin(small, "b:v1", MiB, []), 2)  # 2 of 3 MiB: nothing to evict
        assert small._epochs.read_slots() == [slot], "the put did not consume the stamp"
        reader.mark_read(slot)
        small.tick()
        assert small._epochs.read_slots() == [], "the tick counts it"
    finally:
        reader.close()
