"""StorePolicy validation, profile expansion, wire round trip and shard planning."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from tensorcast_ray._errors import InvalidArgumentError
from tensorcast_ray._policy import (
    COLD_DEFAULT_TTL_MS,
    PROFILES,
    ResolvedPolicy,
    ResolvedTier,
    StorePolicy,
    TierSpec,
    plan_shards,
    resolve_policy,
)

MiB = 1 << 20
DISK = TierSpec("shared_disk", "any")
LOCAL = TierSpec("stable_dram", "local")
PINNED = TierSpec("stable_dram", "local", retention_policy="pinned")
REMOTE = TierSpec("stable_dram", "remote")

VALID: list[tuple[str, Callable[[], object]]] = [
    ("disk must", lambda: StorePolicy(must=[DISK])),
    ("local pinned must", lambda: StorePolicy(must=[PINNED])),
    ("local should no retention", lambda: StorePolicy(should=[LOCAL])),
    ("local may ttl", lambda: StorePolicy(may=[TierSpec("stable_dram", "local", 1, "ttl", 5)])),
    ("remote must", lambda: StorePolicy(must=[REMOTE])),
    ("dram any", lambda: StorePolicy(should=[TierSpec("stable_dram", "any")])),
    ("spill with disk should", lambda: StorePolicy(should=[DISK, LOCAL], overflow_policy="spill")),
    ("spill on durable", lambda: StorePolicy(profile="durable", overflow_policy="spill")),
    ("profile + layout", lambda: StorePolicy(profile="ha", layout="sharded")),
    ("same tier two scopes", lambda: StorePolicy(should=[LOCAL, REMOTE])),
]

# (case, builder, words the message must contain: the field and the rule)
INVALID: list[tuple[str, Callable[[], object], tuple[str, ...]]] = [
    ("unknown tier", lambda: TierSpec("nvme"), ("TierSpec.tier", "'nvme'")),
    ("unknown scope", lambda: TierSpec("stable_dram", "rack"), ("TierSpec.scope", "'rack'")),
    (
        "unknown retention",
        lambda: TierSpec("stable_dram", retention_policy="lru"),
        ("TierSpec.retention_policy", "'lru'"),
    ),
    ("bad replicas", lambda: TierSpec("stable_dram", min_replicas=0), ("min_replicas",)),
    ("bool replicas", lambda: TierSpec("stable_dram", min_replicas=True), ("min_replicas",)),
    ("disk local", lambda: TierSpec("shared_disk", "local"), ("TierSpec.scope", "'any'")),
    ("disk replicas", lambda: TierSpec("shared_disk", "any", 2), ("min_replicas", "shared_disk")),
    (
        "disk retention",
        lambda: TierSpec("shared_disk", "any", retention_policy="pinned"),
        ("shared_disk forbids retention",),
    ),
    (
        "disk ttl ms",
        lambda: TierSpec("shared_disk", "any", retention_ttl_ms=5),
        ("shared_disk forbids retention",),
    ),
    ("dram replicas", lambda: TierSpec("stable_dram", "local", 2), ("min_replicas=1",)),
    (
        "retention remote",
        lambda: TierSpec("stable_dram", "remote", retention_policy="best_effort"),
        ("retention", "scope 'local'"),
    ),
    (
        "ttl without ms",
        lambda: TierSpec("stable_dram", retention_policy="ttl"),
        ("retention_ttl_ms", "positive integer"),
    ),
    (
        "ttl zero",
        lambda: TierSpec("stable_dram", retention_policy="ttl", retention_ttl_ms=0),
        ("retention_ttl_ms", "positive integer"),
    ),
    (
        "ms without ttl",
        lambda: TierSpec("stable_dram", retention_policy="pinned", retention_ttl_ms=5),
        ("retention_ttl_ms", "only with retention_policy 'ttl'"),
    ),
    ("must local unpinned", lambda: StorePolicy(must=[LOCAL]), ("must[0]", "'pinned'")),
    (
        "must local ttl",
        lambda: StorePolicy(must=[TierSpec("stable_dram", "local", 1, "ttl", 5)]),
        ("must[0].retention_policy", "'pinned'"),
    ),
    (
        "spill without disk",
        lambda: StorePolicy(should=[LOCAL], overflow_policy="spill"),
        ("overflow_policy", "shared_disk"),
    ),
    (
        "spill with disk only in may",
        lambda: StorePolicy(should=[LOCAL], may=[DISK], overflow_policy="spill"),
        ("overflow_policy", "must or should"),
    ),
    (
        "spill on cache profile",
        lambda: StorePolicy(profile="cache", overflow_policy="spill"),
        ("overflow_policy",),
    ),
    (
        "duplicate across lists",
        lambda: StorePolicy(must=[DISK], may=[DISK]),
        ("may[0]", "appears twice", "must[0]"),
    ),
    ("duplicate in a list", lambda: StorePolicy(should=[LOCAL, PINNED]), ("should[1]",)),
    ("unknown overflow", lambda: StorePolicy(overflow_policy="drop"), ("overflow_policy",)),
    ("unknown layout", lambda: StorePolicy(layout="striped"), ("layout", "'striped'")),
    ("unknown profile", lambda: StorePolicy(profile="fast"), ("profile", "'fast'")),
    ("profile + lists", lambda: StorePolicy(profile="durable", must=[DISK]), ("profile",)),
    ("non-TierSpec item", lambda: StorePolicy(must=[{"tier": "x"}]), ("must[0]", "TierSpec")),  # type: ignore[list-item]
    ("string as list", lambda: StorePolicy(must="shared_disk"), ("must",)),  # type: ignore[arg-type]
    ("not a policy", lambda: resolve_policy("durable"), ("policy",)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("case,build", VALID, ids=[c for c, _ in VALID])
def test_valid_policies_resolve(case: str, build: Callable[[], object]) -> None:
    policy = build()
    assert isinstance(policy, StorePolicy)
    resolved = resolve_policy(policy)
    assert resolved.tiers


@pytest.mark.parametrize("case,build,words", INVALID, ids=[c for c, _, _ in INVALID])
def test_invalid_policies_are_rejected(
    case: str, build: Callable[[], object], words: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        build()
    assert info.value.status_code == grpc.StatusCode.INVALID_ARGUMENT
    assert not info.value.retryable
    for word in words:
        assert word in info.value.message, (word, info.value.message)


def _tiers(policy: ResolvedPolicy) -> list[tuple[Any, ...]]:
    return [
        (t.tier, t.scope, t.requirement, t.retention_policy, t.retention_ttl_ms)
        for t in policy.tiers
    ]


EXPANSIONS = {
    "cache": ([("stable_dram", "local", "may", "best_effort", None)], "evict"),
    "durable": (
        [
            ("shared_disk", "any", "must", None, None),
            ("stable_dram", "local", "should", "best_effort", None),
        ],
        "evict",
    ),
    "ha": (
        [
            ("shared_disk", "any", "must", None, None),
            ("stable_dram", "remote", "should", None, None),
            ("stable_dram", "local", "should", "best_effort", None),
        ],
        "evict",
    ),
    "cold": (
        [
            ("shared_disk", "any", "must", None, None),
            ("stable_dram", "local", "should", "ttl", COLD_DEFAULT_TTL_MS),
        ],
        "evict",
    ),
    "warm": ([("stable_dram", "local", "should", "best_effort", None)], "reject"),
    "pinned": ([("stable_dram", "local", "must", "pinned", None)], "reject"),
}


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_expansion(profile: str) -> None:
    resolved = resolve_policy(StorePolicy(profile=profile))
    tiers, overflow = EXPANSIONS[profile]
    assert _tiers(resolved) == tiers
    assert resolved.overflow_policy == overflow
    assert resolved.layout == "auto"
    assert resolved.profile == profile
    # from_profile yields the same resolution as the profile name, minus the label.
    explicit = resolve_policy(StorePolicy.from_profile(profile))
    assert _tiers(explicit) == tiers and explicit.overflow_policy == overflow
    assert explicit.profile is None


def test_cold_default_ttl_is_ten_minutes() -> None:
    assert COLD_DEFAULT_TTL_MS == 600_000


def test_no_policy_means_cache() -> None:
    for policy in (None, StorePolicy()):
        resolved = resolve_policy(policy)
        assert resolved.profile == "cache"
        assert _tiers(resolved) == EXPANSIONS["cache"][0]
        assert resolved.overflow_policy == "evict"


def test_overflow_and_layout_override_profile() -> None:
    resolved = resolve_policy(
        StorePolicy(profile="pinned", overflow_policy="evict", layout="unsharded")
    )
    assert resolved.overflow_policy == "evict"
    assert resolved.layout == "unsharded"
    assert _tiers(resolved) == EXPANSIONS["pinned"][0]
    # Only an overflow policy: tiers still come from the cache profile.
    only_overflow = resolve_policy(StorePolicy(overflow_policy="reject"))
    assert only_overflow.profile == "cache" and only_overflow.overflow_policy == "reject"


def test_explicit_lists_default_overflow_evict_and_keep_order() -> None:
    policy = StorePolicy(must=[DISK], should=[REMOTE], may=[LOCAL])
    assert isinstance(policy.must, tuple) and policy.must == (DISK,)
    resolved = resolve_policy(policy)
    assert resolved.overflow_policy == "evict"
    assert [t.requirement for t in resolved.tiers] == ["must", "should", "may"]
    assert resolved.profile is None


def test_editing_a_profile_through_replace() -> None:
    base = StorePolicy.from_profile("durable")
    edited = dataclasses.replace(base, may=(REMOTE,))
    assert [t.scope for t in resolve_policy(edited).tiers] == ["any", "local", "remote"]
    with pytest.raises(InvalidArgumentError, match="appears twice"):
        dataclasses.replace(base, may=(DISK,))
    with pytest.raises(InvalidArgumentError, match="profile"):
        StorePolicy.from_profile("fast")


def test_helpers() -> None:
    ha = resolve_policy(StorePolicy(profile="ha"))
    assert ha.needs_shared_disk and ha.needs_remote
    local = ha.local_stable()
    assert local == ResolvedTier("stable_dram", "local", "should", "best_effort", None)
    cache = resolve_policy(None)
    assert not cache.needs_shared_disk and not cache.needs_remote
    assert cache.local_stable() is not None and cache.local_stable().requirement == "may"  # type: ignore[union-attr]
    disk_only = resolve_policy(StorePolicy(must=[DISK]))
    assert disk_only.local_stable() is None and disk_only.needs_shared_disk
    anywhere = resolve_policy(StorePolicy(should=[TierSpec("stable_dram", "any")]))
    assert anywhere.needs_remote and anywhere.local_stable() is None


@pytest.mark.parametrize("profile", [*PROFILES, None])
def test_dict_round_trip(profile: str | None) -> None:
    policy = StorePolicy(profile=profile, layout="sharded")
    resolved = resolve_policy(policy)
    wire = json.loads(json.dumps(resolved.to_dict()))
    assert ResolvedPolicy.from_dict(wire) == resolved
    explicit = resolve_policy(
        StorePolicy(
            must=[PINNED],
            should=[DISK],
            may=[TierSpec("stable_dram", "any")],
            overflow_policy="spill",
        )
    )
    assert ResolvedPolicy.from_dict(explicit.to_dict()) == explicit


def _wire(**changes: Any) -> dict[str, Any]:
    data = resolve_policy(StorePolicy(profile="durable")).to_dict()
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "data,word",
    [
        ("not a dict", "keys"),
        ({**_wire(), "extra": 1}, "keys"),
        (_wire(version=2), "version"),
        (_wire(tiers=[]), "tiers"),
        (_wire(tiers=[{"tier": "shared_disk"}]), "tiers[0]"),
        (_wire(profile="fast"), "profile"),
        (_wire(overflow_policy="drop"), "overflow_policy"),
        (
            _wire(
                tiers=[
                    {
                        "tier": "stable_dram",
                        "scope": "local",
                        "requirement": "must",
                        "min_replicas": 1,
                        "retention_policy": "best_effort",
                        "retention_ttl_ms": None,
                    }
                ]
            ),
            "'pinned'",
        ),
        (
            _wire(
                tiers=[
                    {
                        "tier": "shared_disk",
                        "scope": "any",
                        "requirement": "always",
                        "min_replicas": 1,
                        "retention_policy": None,
                        "retention_ttl_ms": None,
                    }
                ]
            ),
            "requirement",
        ),
    ],
)
def test_from_dict_rejects_bad_input(data: Any, word: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        ResolvedPolicy.from_dict(data)
    assert word in info.value.message


def _shard_sizes(sizes: list[int], shards: list[list[int]]) -> list[int]:
    return [sum(sizes[i] for i in shard) for shard in shards]


def _check_whole_and_ordered(sizes: list[int], shards: list[list[int]]) -> None:
    assert [i for shard in shards for i in shard] == list(range(len(sizes)))


@pytest.mark.parametrize(
    "total,layout,count",
    [
        (128 * MiB, "auto", 1),  # at the threshold: not sharded
        (128 * MiB + 1 * MiB, "auto", 2),
        (1024 * MiB, "unsharded", 1),
        (100 * MiB, "sharded", 1),  # two shards would both fall under 64 MiB
        (128 * MiB, "sharded", 2),
        (1024 * MiB, "auto", 8),
        (1024 * MiB, "sharded", 16),
    ],
)
def test_plan_shards_counts(total: int, layout: str, count: int) -> None:
    sizes = [MiB] * (total // MiB)
    shards = plan_shards(total, sizes, layout)
    _check_whole_and_ordered(sizes, shards)
    assert len(shards) == count
    if count > 1:
        assert all(64 * MiB <= s <= 256 * MiB for s in _shard_sizes(sizes, shards))


def test_plan_shards_balances_instead_of_piling_on_the_tail() -> None:
    sizes = [10 * MiB] * 30
    shards = plan_shards(300 * MiB, sizes, "sharded")
    _check_whole_and_ordered(sizes, shards)
    assert _shard_sizes(sizes, shards) == [80 * MiB, 70 * MiB, 80 * MiB, 70 * MiB]


def test_plan_shards_oversize_tensor_gets_own_shard() -> None:
    sizes = [10 * MiB, 300 * MiB, 10 * MiB, 680 * MiB]
    shards = plan_shards(sum(sizes), sizes, "auto")
    assert shards == [[0], [1], [2], [3]]
    assert plan_shards(300 * MiB, [300 * MiB], "sharded") == [[0]]


def test_plan_shards_never_groups_past_the_cap() -> None:
    sizes = [200 * MiB, 100 * MiB, 100 * MiB, 30 * MiB]
    shards = plan_shards(sum(sizes), sizes, "auto")
    _check_whole_and_ordered(sizes, shards)
    assert max(_shard_sizes(sizes, shards)) <= 256 * MiB
    # The small tail joins its neighbour rather than standing alone.
    assert _shard_sizes(sizes, shards)[-1] >= 64 * MiB


def test_plan_shards_edge_inputs() -> None:
    assert plan_shards(0, [], "auto") == [[]]
    assert plan_shards(0, [], "sharded") == [[]]
    assert plan_shards(10, [4, 4], "auto") == [[0, 1]]  # total may include padding
    with pytest.raises(InvalidArgumentError, match="layout"):
        plan_shards(1, [1], "striped")
    with pytest.raises(InvalidArgumentError, match=r"tensor_sizes\[1\]"):
        plan_shards(10, [1, -1], "auto")
    with pytest.raises(InvalidArgumentError, match="total_bytes"):
        plan_shards(1, [4, 4], "auto")


def test_remote_stable_tier_may_ask_for_several_copies() -> None:
    """Beyond the original (one local copy), a remote tier asks for ``min_replicas`` copies on
    other nodes; the persistence task places that many."""
    from tensorcast_ray.daemon.persistence import plan_task

    policy = resolve_policy(
        StorePolicy(
            must=[TierSpec("shared_disk", "any")],
            should=[TierSpec("stable_dram", "remote", 2), TierSpec("stable_dram", "local")],
        )
    )
    plan = plan_task(policy)
    assert (plan.disk, plan.remote, plan.remote_replicas) == ("must", "should", 2)
    assert not plan_task(resolve_policy(StorePolicy(profile="cache")))
    ha = plan_task(resolve_policy(StorePolicy(profile="ha")))
    assert (ha.disk, ha.remote, ha.remote_replicas) == ("must", "should", 1)
