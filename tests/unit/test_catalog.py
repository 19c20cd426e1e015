"""The catalog state machine (keys → versions → artifacts) and the key grammar, without Ray."""

from __future__ import annotations

import grpc
import pytest

from tensorcast_ray._catalog import MAX_KEY_LENGTH, Catalog, parse_key
from tensorcast_ray._errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)


# ---- parse_key ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("llama:v1", ("llama", "v1")),
        ("org/model:step-10", ("org/model", "step-10")),
        ("a:b:c", ("a:b", "c")),  # the last ':' separates: names may contain ':'
        ("x:latest", ("x", "latest")),
        ("名前:v1", ("名前", "v1")),
    ],
)
def test_parse_key_accepts(key: str, expected: tuple[str, str]) -> None:
    assert parse_key(key) == expected


@pytest.mark.parametrize(
    "key",
    ["", "llama", ":v1", "llama:", ":", "a:b:", "x\n:v1", "x:v\x7f", "x:\tv", None, 3, b"x:v1"],
)
def test_parse_key_rejects(key: object) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        parse_key(key)
    assert err.value.status_code == grpc.StatusCode.INVALID_ARGUMENT


def test_parse_key_length_limit() -> None:
    at_limit = "n" * (MAX_KEY_LENGTH - 3) + ":v1"
    assert len(at_limit) == MAX_KEY_LENGTH
    assert parse_key(at_limit) == ("n" * (MAX_KEY_LENGTH - 3), "v1")
    with pytest.raises(InvalidArgumentError, match=str(MAX_KEY_LENGTH)):
        parse_key("n" + at_limit)


def test_latest_is_readable_but_not_writable() -> None:
    assert parse_key("x:latest") == ("x", "latest")
    with pytest.raises(InvalidArgumentError, match="latest"):
        parse_key("x:latest", for_write=True)
    assert parse_key("x:latest2", for_write=True) == ("x", "latest2")


# ---- reserve / commit / abort ---------------------------------------------------------------
def test_reserved_version_is_invisible_until_commit() -> None:
    cat = Catalog()
    cat.reserve("m:v1", "a1")
    assert not cat.exists("m:v1") and not cat.exists("m:latest")
    assert cat.list_keys() == [] and len(cat) == 0
    with pytest.raises(NotFoundError):
        cat.resolve("m:v1")
    with pytest.raises(NotFoundError):
        cat.resolve("m:latest")
    cat.commit("m:v1")
    assert cat.resolve("m:v1") == ("m:v1", "a1")
    assert cat.resolve("m:latest") == ("m:v1", "a1")
    assert cat.list_keys() == ["m:v1"] and len(cat) == 1
    assert cat.key_of("a1") == "m:v1"


def test_versions_are_immutable_in_flight_and_after_commit() -> None:
    cat = Catalog()
    cat.reserve("m:v1", "a1")
    with pytest.raises(AlreadyExistsError, match="being written") as err:
        cat.reserve("m:v1", "a2")
    assert err.value.status_code == grpc.StatusCode.ALREADY_EXISTS
    cat.commit("m:v1")
    with pytest.raises(AlreadyExistsError, match="already exists"):
        cat.reserve("m:v1", "a3")
    assert cat.resolve("m:v1") == ("m:v1", "a1")  # the loser changed nothing
    assert cat.key_of("a2") is None and cat.key_of("a3") is None


def test_reserve_latest_is_invalid() -> None:
    with pytest.raises(InvalidArgumentError):
        Catalog().reserve("m:latest", "a1")


def test_commit_without_reserve_fails() -> None:
    cat = Catalog()
    with pytest.raises(FailedPreconditionError) as err:
        cat.commit("m:v1")
    assert err.value.status_code == grpc.StatusCode.FAILED_PRECONDITION


def test_abort_drops_only_uncommitted_reservations() -> None:
    cat = Catalog()
    cat.reserve("m:v1", "a1")
    cat.abort("m:v1")
    assert cat.key_of("a1") is None and cat.names() == 0
    cat.reserve("m:v1", "a2")  # the version is free again
    cat.commit("m:v1")
    cat.abort("m:v1")  # a committed version is not aborted
    assert cat.resolve("m:v1") == ("m:v1", "a2")
    cat.abort("m:never")  # unknown: no-op
    assert cat.list_keys() == ["m:v1"]


# ---- latest -----------------------------------------------------------------------------------
def test_latest_follows_commit_order_not_lexical_order() -> None:
    cat = Catalog()
    for version, aid in (("v10", "a10"), ("v9", "a9")):
        cat.reserve(f"m:{version}", aid)
        cat.commit(f"m:{version}")
    assert cat.resolve("m:latest") == ("m:v9", "a9")


def test_latest_follows_commit_not_reserve_order() -> None:
    cat = Catalog()
    cat.reserve("m:first", "a1")
    cat.reserve("m:second", "a2")
    cat.commit("m:second")
    assert cat.resolve("m:latest") == ("m:second", "a2")
    cat.commit("m:first")  # committed last: it is now the newest
    assert cat.resolve("m:latest") == ("m:first", "a1")


def test_latest_falls_back_when_newest_is_removed() -> None:
    cat = Catalog()
    for v in ("v1", "v2", "v3"):
        cat.reserve(f"m:{v}", f"a-{v}")
        cat.commit(f"m:{v}")
    assert cat.remove_key("m:v3") == "a-v3"
    assert cat.resolve("m:latest") == ("m:v2", "a-v2")
    assert cat.remove_artifact("a-v2") == "m:v2"
    assert cat.resolve("m:latest") == ("m:v1", "a-v1")
    cat.remove_key("m:v1")
    with pytest.raises(NotFoundError):
        cat.resolve("m:latest")
    assert cat.names() == 0


def test_names_are_independent() -> None:
    cat = Catalog()
    for key, aid in (("a:v1", "1"), ("b:v1", "2"), ("a:v2", "3")):
        cat.reserve(key, aid)
        cat.commit(key)
    assert cat.resolve("b:latest") == ("b:v1", "2")
    assert cat.resolve("a:latest") == ("a:v2", "3")
    assert cat.names() == 2


# ---- remove ---------------------------------------------------------------------------------
def test_remove_key_rules() -> None:
    cat = Catalog()
    cat.reserve("m:v1", "a1")
    cat.commit("m:v1")
    with pytest.raises(InvalidArgumentError, match="explicit version"):
        cat.remove_key("m:latest")
    assert cat.exists("m:v1")  # refusing latest removed nothing
    with pytest.raises(NotFoundError):
        cat.remove_key("m:v2")
    assert cat.remove_key("m:v1") == "a1"
    assert not cat.exists("m:v1") and cat.key_of("a1") is None
    with pytest.raises(NotFoundError) as err:
        cat.remove_key("m:v1")
    assert err.value.status_code == grpc.StatusCode.NOT_FOUND


def test_remove_key_of_uncommitted_is_not_found() -> None:
    cat = Catalog()
    cat.reserve("m:v1", "a1")
    with pytest.raises(NotFoundError):
        cat.remove_key("m:v1")
    assert cat.key_of("a1") == "m:v1"  # the reservation is untouched
    cat.commit("m:v1")
    assert cat.exists("m:v1")


def test_remove_artifact_unknown_is_none() -> None:
    cat = Catalog()
    assert cat.remove_artifact("nope") is None


def test_removed_version_can_be_written_again() -> None:
    cat = Catalog()
    cat.reserve("m:v1", "a1")
    cat.commit("m:v1")
    cat.remove_key("m:v1")
    cat.reserve("m:v1", "a2")
    cat.commit("m:v1")
    assert cat.resolve("m:v1") == ("m:v1", "a2")


# ---- list_keys ------------------------------------------------------------------------------
def test_list_keys_prefix_sorted_committed_only() -> None:
    cat = Catalog()
    for key in ("b:v1", "a:v2", "a:v1", "ab:v1", "c:x"):
        cat.reserve(key, "id-" + key)
        cat.commit(key)
    cat.reserve("a:v3", "pending")
    assert cat.list_keys() == ["a:v1", "a:v2", "ab:v1", "b:v1", "c:x"]
    assert cat.list_keys("a") == ["a:v1", "a:v2", "ab:v1"]
    assert cat.list_keys("a:") == ["a:v1", "a:v2"]
    assert cat.list_keys("zzz") == []
    assert len(cat) == 5


def test_a_landed_copy_never_becomes_the_newest() -> None:
    """A copy landed here (pulled from another node, read back from shared disk) ranks for
    latest below every version written here, and among copies by creation time."""
    from tensorcast_ray._catalog import Catalog

    cat = Catalog()
    cat.reserve("m:v2", "b")
    cat.commit("m:v2")
    cat.reserve("m:v1", "a")
    cat.commit("m:v1", landed_ms=1_000)  # v1 read back from disk after v2 was written
    assert cat.resolve("m:latest") == ("m:v2", "b")
    cat.remove_key("m:v2")
    cat.reserve("m:v0", "z")
    cat.commit("m:v0", landed_ms=500)
    assert cat.resolve("m:latest") == ("m:v1", "a")  # the newer of the two copies
