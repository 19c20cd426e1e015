"""The node's validity table (EpochTable / EpochReader) on a plain directory, without Ray."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tensorcast_ray._epochs import EpochReader, EpochTable
from tensorcast_ray._errors import ResourceExhaustedError

SLOTS = 16


@pytest.fixture
def table(tmp_path: Path) -> Iterator[EpochTable]:
    t = EpochTable(str(tmp_path), "epochs", SLOTS)
    yield t
    t.close(unlink=True)


def test_file_created_private_and_sized(table: EpochTable, tmp_path: Path) -> None:
    st = os.stat(tmp_path / "epochs")
    assert st.st_size == SLOTS * 8
    assert st.st_mode & 0o777 == 0o600


def test_alloc_writes_a_generation_readers_see(table: EpochTable, tmp_path: Path) -> None:
    reader = EpochReader(str(tmp_path), "epochs", SLOTS)
    try:
        slot, gen = table.alloc()
        assert gen > 0 and 0 <= slot < SLOTS
        assert reader.valid(slot, gen)
        assert not reader.valid(slot, gen + 1)
        table.free(slot)
        assert not reader.valid(slot, gen)  # seen at once, no RPC
    finally:
        reader.close()


def test_generations_never_reused_even_when_slots_are(table: EpochTable) -> None:
    gens: list[int] = []
    slots: set[int] = set()
    for _ in range(5 * SLOTS):
        slot, gen = table.alloc()
        gens.append(gen)
        slots.add(slot)
        table.free(slot)
    assert len(slots) < len(gens)  # slots are recycled ...
    assert all(a < b for a, b in itertools.pairwise(gens))  # ... generations only grow


def test_stale_reader_of_reused_slot_is_invalid(table: EpochTable, tmp_path: Path) -> None:
    reader = EpochReader(str(tmp_path), "epochs", SLOTS)
    try:
        live = [table.alloc() for _ in range(SLOTS)]
        slot, old_gen = live[3]
        table.free(slot)
        new_slot, new_gen = table.alloc()
        assert new_slot == slot  # the only free slot
        assert not reader.valid(slot, old_gen)
        assert reader.valid(slot, new_gen)
    finally:
        reader.close()


def test_full_table_is_resource_exhausted(table: EpochTable) -> None:
    allocated = {table.alloc()[0] for _ in range(SLOTS)}
    assert allocated == set(range(SLOTS))
    with pytest.raises(ResourceExhaustedError, match="epoch_slots") as err:
        table.alloc()
    assert err.value.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    table.free(5)
    assert table.alloc()[0] == 5


def test_free_ignores_bad_and_already_free_slots(table: EpochTable) -> None:
    slot, _ = table.alloc()
    table.free(slot)
    table.free(slot)  # twice: must not be handed out twice
    table.free(-1)
    table.free(SLOTS)
    got = [table.alloc()[0] for _ in range(SLOTS)]
    assert sorted(got) == list(range(SLOTS))
    with pytest.raises(ResourceExhaustedError):
        table.alloc()


def test_reader_rejects_zero_generation_and_out_of_range(table: EpochTable, tmp_path: Path) -> None:
    reader = EpochReader(str(tmp_path), "epochs", SLOTS)
    try:
        assert not reader.valid(0, 0)  # a free slot holds 0: never "valid"
        assert not reader.valid(-1, 1)
        assert not reader.valid(SLOTS, 1)
    finally:
        reader.close()


def test_restore_after_reopen_then_release_unclaimed(tmp_path: Path) -> None:
    first = EpochTable(str(tmp_path), "epochs", SLOTS)
    kept = first.alloc()
    dropped = first.alloc()
    wrong = first.alloc()
    max_gen = max(g for _, g in (kept, dropped, wrong))
    first.close(unlink=False)
    assert (tmp_path / "epochs").exists()

    second = EpochTable(str(tmp_path), "epochs", SLOTS, adopt=True)
    reader = EpochReader(str(tmp_path), "epochs", SLOTS)
    try:
        # Before release, every old slot still reads as valid (readers keep working).
        assert all(reader.valid(s, g) for s, g in (kept, dropped, wrong))
        assert second.restore(*kept)
        assert not second.restore(*kept)  # claimed once only
        assert not second.restore(wrong[0], wrong[1] + 1)  # generation mismatch
        assert not second.restore(SLOTS + 3, 1)
        assert second.release_unclaimed() == 2
        assert second.release_unclaimed() == 0
        assert reader.valid(*kept)
        assert not reader.valid(*dropped) and not reader.valid(*wrong)
        # New generations continue above every generation the old table held.
        slot, gen = second.alloc()
        assert gen > max_gen and slot != kept[0]
        # The released slots are free again; the kept one is not handed out.
        taken = {slot} | {second.alloc()[0] for _ in range(SLOTS - 2)}
        assert kept[0] not in taken
        with pytest.raises(ResourceExhaustedError):
            second.alloc()
    finally:
        reader.close()
        second.close(unlink=True)
    assert not (tmp_path / "epochs").exists()


def test_reopen_without_adopt_starts_empty(tmp_path: Path) -> None:
    first = EpochTable(str(tmp_path), "epochs", SLOTS)
    slot, gen = first.alloc()
    first.close(unlink=False)
    second = EpochTable(str(tmp_path), "epochs", SLOTS)
    reader = EpochReader(str(tmp_path), "epochs", SLOTS)
    try:
        assert not reader.valid(slot, gen)
        assert not second.restore(slot, gen)
        assert second.release_unclaimed() == 0
    finally:
        reader.close()
        second.close(unlink=True)


def test_adopt_of_wrong_size_starts_empty(tmp_path: Path) -> None:
    first = EpochTable(str(tmp_path), "epochs", SLOTS)
    first.alloc()
    first.close(unlink=False)
    second = EpochTable(str(tmp_path), "epochs", SLOTS * 2, adopt=True)
    try:
        assert os.path.getsize(tmp_path / "epochs") == SLOTS * 16
        assert second.release_unclaimed() == 0
        assert second.alloc()[1] > 0
    finally:
        second.close(unlink=True)


def test_close_without_unlink_keeps_file(tmp_path: Path) -> None:
    t = EpochTable(str(tmp_path), "epochs", SLOTS)
    t.close(unlink=False)
    assert (tmp_path / "epochs").exists()
    t2 = EpochTable(str(tmp_path), "epochs", SLOTS, adopt=True)
    t2.close(unlink=True)
    assert not (tmp_path / "epochs").exists()


def test_a_table_closed_for_good_is_invalid_for_readers_still_mapping_it(
    tmp_path: Path,
) -> None:
    """A clean daemon stop: processes that cached artifacts must not keep trusting them."""
    t = EpochTable(str(tmp_path), "epochs", SLOTS)
    slot, gen = t.alloc()
    reader = EpochReader(str(tmp_path), "epochs", SLOTS)
    try:
        assert reader.valid(slot, gen)
        t.close(unlink=True)
        assert not reader.valid(slot, gen)
    finally:
        reader.close()


def test_a_new_table_invalidates_the_one_it_replaces(tmp_path: Path) -> None:
    first = EpochTable(str(tmp_path), "epochs", SLOTS)
    slot, gen = first.alloc()
    reader = EpochReader(str(tmp_path), "epochs", SLOTS)
    first.close(unlink=False)
    second = EpochTable(str(tmp_path), "epochs", SLOTS)  # no adopt: a fresh table
    try:
        assert not reader.valid(slot, gen), "the old mapping is zeroed before the unlink"
        slot2, gen2 = second.alloc()
        assert (slot2, gen2) != (slot, gen), "a new table starts generations elsewhere"
    finally:
        reader.close()
        second.close(unlink=True)


def test_fresh_tables_start_generations_at_random_points(tmp_path: Path) -> None:
    firsts = set()
    for i in range(4):
        t = EpochTable(str(tmp_path), f"epochs{i}", SLOTS)
        firsts.add(t.alloc()[1])
        t.close(unlink=True)
    assert len(firsts) == 4 and all(g > 0 for g in firsts)


def test_read_cache_forgets_everything_when_the_daemon_instance_changes(tmp_path: Path) -> None:
    from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2
    from tensorcast_ray._read_cache import ReadCache

    t = EpochTable(str(tmp_path), "epochs", SLOTS)
    slot, gen = t.alloc()
    cache = ReadCache()
    try:
        cache.attach_epochs(str(tmp_path), "epochs", SLOTS, "instance-a")
        info = daemon_pb2.ArtifactInfo(
            artifact_id="a1", key="k:v1", epoch_slot=slot, generation=gen, shm_dir=str(tmp_path)
        )
        cache.admit(info)
        assert cache.lookup_key("k:v1") is not None
        reader = cache._epochs
        cache.attach_epochs(str(tmp_path), "epochs", SLOTS, "instance-a")
        assert cache._epochs is reader, "same instance: nothing changes"
        cache.attach_epochs(str(tmp_path), "epochs", SLOTS, "instance-b")
        assert cache._epochs is not reader
        assert cache.lookup_key("k:v1") is None, "entries of the old instance are gone"
    finally:
        cache.clear()
        t.close(unlink=True)


def _info(tmp_path: Path, artifact_id: str, key: str, slot: int, gen: int):  # type: ignore[no-untyped-def]
    from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

    return daemon_pb2.ArtifactInfo(
        artifact_id=artifact_id, key=key, epoch_slot=slot, generation=gen, shm_dir=str(tmp_path)
    )


def test_read_cache_clear_leaves_a_reader_in_use_working(tmp_path: Path) -> None:
    """Another thread may be inside valid() or check_read() with the reader clear() drops."""
    from tensorcast_ray._read_cache import ReadCache

    t = EpochTable(str(tmp_path), "epochs", SLOTS)
    slot, gen = t.alloc()
    cache = ReadCache()
    try:
        cache.attach_epochs(str(tmp_path), "epochs", SLOTS, "instance-a")
        in_use = cache._epochs
        assert in_use is not None
        cache.clear()
        assert in_use.valid(slot, gen), "the dropped reader still answers"
        in_use.mark_read(slot)
        assert not cache.valid(_info(tmp_path, "a1", "k:v1", slot, gen)), "nothing attached"
    finally:
        t.close(unlink=True)


def test_read_cache_drops_one_artifact_and_keeps_the_others_keys(tmp_path: Path) -> None:
    from tensorcast_ray._read_cache import ReadCache

    t = EpochTable(str(tmp_path), "epochs", SLOTS)
    (sa, ga), (sb, gb) = t.alloc(), t.alloc()
    cache = ReadCache()
    try:
        cache.attach_epochs(str(tmp_path), "epochs", SLOTS, "instance-a")
        cache.admit(_info(tmp_path, "a1", "a:v1", sa, ga))
        cache.admit(_info(tmp_path, "b1", "b:v1", sb, gb))
        cache.admit(_info(tmp_path, "b1", "b:latest-alias", sb, gb))
        t.free(sa)
        cache.admit(_info(tmp_path, "b1", "b:v1", sb, gb))
        assert "a1" in cache._by_id, "admit does not sweep the whole cache; the sweeper does"
        assert cache.lookup_key("a:v1") is None, "a lookup sees the freed slot"
        assert cache.lookup_key("a:v1") is None
        t.free(sb)
        assert cache.lookup_key("b:v1") is None
        assert cache.lookup_key("b:latest-alias") is None, "every key of the dropped id goes"
        assert cache._by_key == {} and cache._keys_of == {}
    finally:
        cache.clear()
        t.close(unlink=True)
