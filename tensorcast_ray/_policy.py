"""Every StorePolicy rule: validation, profile expansion, resolution, shard planning.  [SDK, daemon]

The SDK builds a :class:`StorePolicy` (validated as it is built, so a bad policy fails in the
caller's own line) and sends ``resolve_policy(policy).to_dict()`` to the daemon; the daemon
rebuilds it with :meth:`ResolvedPolicy.from_dict`, which runs the very same checks, and is the
authority that acts on it.  Keeping the rules in this one pure module (no I/O, no torch, no
ray) is what stops the two processes from disagreeing about what a policy means.

Decisions this module makes, so callers need not:

- no policy, or one with neither a profile nor tiers, means the ``cache`` profile;
- a profile plus explicit ``must``/``should``/``may`` lists is rejected (it is ambiguous
  whether the lists add to or replace the profile's); start from
  :meth:`StorePolicy.from_profile` and edit its lists instead.  ``overflow_policy`` and
  ``layout`` given beside a profile override the profile's;
- a local stable tier without a retention resolves to ``best_effort``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tensorcast_ray._errors import InvalidArgumentError

__all__ = [
    "COLD_DEFAULT_TTL_MS",
    "LAYOUTS",
    "OVERFLOW_POLICIES",
    "PROFILES",
    "REQUIREMENTS",
    "RETENTION_POLICIES",
    "SCOPES",
    "SHARD_MAX_BYTES",
    "SHARD_MIN_BYTES",
    "SHARD_THRESHOLD_BYTES",
    "TIERS",
    "ResolvedPolicy",
    "ResolvedTier",
    "StorePolicy",
    "TierSpec",
    "plan_shards",
    "resolve_policy",
]

TIERS = ("stable_dram", "shared_disk")
SCOPES = ("local", "remote", "any")
REQUIREMENTS = ("must", "should", "may")
RETENTION_POLICIES = ("best_effort", "ttl", "pinned")
OVERFLOW_POLICIES = ("evict", "reject", "spill")
LAYOUTS = ("auto", "unsharded", "sharded")
PROFILES = ("cache", "durable", "ha", "cold", "warm", "pinned")

#: how long the ``cold`` profile keeps its local copy after the last access (10 minutes):
#: long enough to serve a burst of readers, short enough not to hoard DRAM.
COLD_DEFAULT_TTL_MS = 10 * 60 * 1000

MiB = 1 << 20
#: with layout ``auto``, artifacts strictly larger than this are sharded.
SHARD_THRESHOLD_BYTES = 128 * MiB
SHARD_MIN_BYTES = 64 * MiB
SHARD_MAX_BYTES = 256 * MiB

_WIRE_VERSION = 1


def _fail(where: str, rule: str, got: object) -> InvalidArgumentError:
    return InvalidArgumentError(f"{where}: {rule} (got {got!r})")


def _check_choice(where: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise _fail(where, f"must be one of {', '.join(map(repr, choices))}", value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TierSpec:
    """One tier a policy asks for; checked for consistency when built.

    ``tier``: ``"stable_dram"`` (daemon memory) or ``"shared_disk"`` (fsspec storage).
    ``scope``: ``"local"`` (this node), ``"remote"`` (another node) or ``"any"``.
    ``retention_policy`` / ``retention_ttl_ms`` apply to local stable DRAM only.
    """

    tier: str
    scope: str = "local"
    min_replicas: int = 1
    retention_policy: str | None = None
    retention_ttl_ms: int | None = None

    def __post_init__(self) -> None:
        _check_choice("TierSpec.tier", self.tier, TIERS)
        _check_choice("TierSpec.scope", self.scope, SCOPES)
        replicas, retention, ttl = self.min_replicas, self.retention_policy, self.retention_ttl_ms
        _require(
            _is_int(replicas) and replicas >= 1,
            "min_replicas",
            "must be a positive integer",
            replicas,
        )
        if retention is not None:
            _check_choice("TierSpec.retention_policy", retention, RETENTION_POLICIES)
        has_retention = retention is not None or ttl is not None
        if self.tier == "shared_disk":
            _require(self.scope == "any", "scope", "shared_disk requires scope 'any'", self.scope)
            _require(
                replicas == 1, "min_replicas", "shared_disk supports only min_replicas=1", replicas
            )
            _require(
                not has_retention,
                "retention_policy",
                "shared_disk forbids retention_policy and retention_ttl_ms",
                (retention, ttl),
            )
            return
        _require(
            replicas == 1 or self.scope != "local",
            "min_replicas",
            "a local stable_dram tier is this node's one copy: min_replicas=1 (ask for more "
            "copies with scope 'remote')",
            replicas,
        )
        _require(
            not has_retention or self.scope == "local",
            "retention_policy",
            "stable_dram takes retention fields only with scope 'local'",
            self.scope,
        )
        if retention == "ttl":
            _require(
                _is_int(ttl) and ttl is not None and ttl > 0,
                "retention_ttl_ms",
                "retention_policy 'ttl' requires a positive integer retention_ttl_ms",
                ttl,
            )
        else:
            _require(
                ttl is None,
                "retention_ttl_ms",
                "retention_ttl_ms is allowed only with retention_policy 'ttl'",
                ttl,
            )


def _require(ok: bool, field: str, rule: str, got: object) -> None:
    if not ok:
        raise _fail(f"TierSpec.{field}", rule, got)


def _local_stable(retention: str, ttl_ms: int | None = None) -> TierSpec:
    return TierSpec("stable_dram", "local", retention_policy=retention, retention_ttl_ms=ttl_ms)


_DISK = TierSpec("shared_disk", "any")
_Expansion = tuple[tuple[TierSpec, ...], tuple[TierSpec, ...], tuple[TierSpec, ...], str]
# profile -> (must, should, may, overflow_policy)
_PROFILES: dict[str, _Expansion] = {
    "cache": ((), (), (_local_stable("best_effort"),), "evict"),
    "durable": ((_DISK,), (_local_stable("best_effort"),), (), "evict"),
    "ha": (
        (_DISK,),
        (TierSpec("stable_dram", "remote"), _local_stable("best_effort")),
        (),
        "evict",
    ),
    "cold": ((_DISK,), (_local_stable("ttl", COLD_DEFAULT_TTL_MS),), (), "evict"),
    "warm": ((), (_local_stable("best_effort"),), (), "reject"),
    "pinned": ((_local_stable("pinned"),), (), (), "reject"),
}


def _as_tiers(where: str, value: object) -> tuple[TierSpec, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _fail(where, "must be a list or tuple of TierSpec", value)
    tiers = tuple(value)
    for i, spec in enumerate(tiers):
        if not isinstance(spec, TierSpec):
            raise _fail(f"{where}[{i}]", "must be a TierSpec", spec)
    return tiers


@dataclasses.dataclass(frozen=True, init=False)
class StorePolicy:
    """Where an artifact must, should and may live, and what to do when DRAM is full.

    Either name a ``profile`` or list tiers; see the module docstring for how they combine.
    Any sequence is accepted for ``must`` / ``should`` / ``may``; they are stored as tuples.
    """

    profile: str | None
    must: tuple[TierSpec, ...]
    should: tuple[TierSpec, ...]
    may: tuple[TierSpec, ...]
    overflow_policy: str | None
    layout: str

    # A hand-written __init__ so callers may pass lists and still type-check; the
    # parameter names match the fields, so dataclasses.replace keeps working.
    def __init__(
        self,
        profile: str | None = None,
        must: Iterable[TierSpec] = (),
        should: Iterable[TierSpec] = (),
        may: Iterable[TierSpec] = (),
        overflow_policy: str | None = None,
        layout: str = "auto",
    ) -> None:
        object.__setattr__(self, "profile", profile)
        object.__setattr__(self, "must", _as_tiers("StorePolicy.must", must))
        object.__setattr__(self, "should", _as_tiers("StorePolicy.should", should))
        object.__setattr__(self, "may", _as_tiers("StorePolicy.may", may))
        object.__setattr__(self, "overflow_policy", overflow_policy)
        object.__setattr__(self, "layout", layout)
        _expand(self)  # validates the whole policy now, in the caller's frame

    @classmethod
    def from_profile(cls, profile: str) -> StorePolicy:
        """The explicit policy a profile stands for, ready to edit with ``dataclasses.replace``."""
        _check_choice("StorePolicy.profile", profile, PROFILES)
        must, should, may, overflow = _PROFILES[profile]
        return cls(must=must, should=should, may=may, overflow_policy=overflow)


@dataclasses.dataclass(frozen=True)
class ResolvedTier:
    """One tier of a resolved policy, tagged with how hard it is required."""

    tier: str
    scope: str
    requirement: str
    retention_policy: str | None = None
    retention_ttl_ms: int | None = None
    min_replicas: int = 1

    @property
    def is_local_stable(self) -> bool:
        return self.tier == "stable_dram" and self.scope == "local"


@dataclasses.dataclass(frozen=True)
class ResolvedPolicy:
    """A validated policy with profiles expanded and defaults filled in.

    ``tiers`` keeps must, then should, then may, each in the caller's order.
    """

    tiers: tuple[ResolvedTier, ...]
    overflow_policy: str
    layout: str
    profile: str | None = None

    def local_stable(self) -> ResolvedTier | None:
        """The local stable DRAM tier the daemon admits synchronously, if any."""
        return next((t for t in self.tiers if t.is_local_stable), None)

    @property
    def needs_shared_disk(self) -> bool:
        return any(t.tier == "shared_disk" for t in self.tiers)

    @property
    def needs_remote(self) -> bool:
        """Whether a stable DRAM copy must be placed beyond this node's own admission.

        Scope ``any`` counts: the local copy is governed by the local tier alone.
        """
        return any(t.tier == "stable_dram" and t.scope != "local" for t in self.tiers)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict for the wire and the journal."""
        return {
            "version": _WIRE_VERSION,
            "profile": self.profile,
            "overflow_policy": self.overflow_policy,
            "layout": self.layout,
            "tiers": [dataclasses.asdict(t) for t in self.tiers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResolvedPolicy:
        """Rebuild from :meth:`to_dict` output, re-running every validation rule."""
        keys = {"version", "profile", "overflow_policy", "layout", "tiers"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise _fail("ResolvedPolicy", f"needs exactly the keys {sorted(keys)}", data)
        if data["version"] != _WIRE_VERSION:
            raise _fail(
                "ResolvedPolicy.version",
                f"only version {_WIRE_VERSION} is understood; upgrade tensorcast_ray on this node",
                data["version"],
            )
        if data["profile"] is not None:
            _check_choice("ResolvedPolicy.profile", data["profile"], PROFILES)
        raw_tiers = data["tiers"]
        if not isinstance(raw_tiers, list) or not raw_tiers:
            raise _fail("ResolvedPolicy.tiers", "must be a non-empty list", raw_tiers)
        tier_keys = {f.name for f in dataclasses.fields(ResolvedTier)}
        spec_keys = [f.name for f in dataclasses.fields(TierSpec)]
        lists: dict[str, list[TierSpec]] = {name: [] for name in REQUIREMENTS}
        for i, raw in enumerate(raw_tiers):
            where = f"ResolvedPolicy.tiers[{i}]"
            if not isinstance(raw, Mapping) or set(raw) != tier_keys:
                raise _fail(where, f"needs exactly the keys {sorted(tier_keys)}", raw)
            _check_choice(f"{where}.requirement", raw["requirement"], REQUIREMENTS)
            lists[raw["requirement"]].append(TierSpec(**{k: raw[k] for k in spec_keys}))
        # Rebuilding through StorePolicy runs the cross-tier rules exactly as the SDK did.
        explicit = StorePolicy(
            None,
            lists["must"],
            lists["should"],
            lists["may"],
            data["overflow_policy"],
            data["layout"],
        )
        resolved = _expand(explicit)
        return cls(resolved.tiers, resolved.overflow_policy, resolved.layout, data["profile"])


def _expand(policy: StorePolicy) -> ResolvedPolicy:
    """Apply the profile and defaults, then check the rules that span several tiers."""
    if policy.profile is not None:
        _check_choice("StorePolicy.profile", policy.profile, PROFILES)
    if policy.overflow_policy is not None:
        _check_choice("StorePolicy.overflow_policy", policy.overflow_policy, OVERFLOW_POLICIES)
    _check_choice("StorePolicy.layout", policy.layout, LAYOUTS)
    explicit = bool(policy.must or policy.should or policy.may)
    if policy.profile is not None and explicit:
        raise _fail(
            "StorePolicy.profile",
            "a profile cannot be combined with explicit must/should/may lists; use "
            "dataclasses.replace(StorePolicy.from_profile(name), ...) to edit a profile",
            policy.profile,
        )
    profile = policy.profile
    if explicit:
        lists = {"must": policy.must, "should": policy.should, "may": policy.may}
        overflow = policy.overflow_policy or "evict"
    else:
        profile = profile or "cache"
        must, should, may, default_overflow = _PROFILES[profile]
        lists = {"must": must, "should": should, "may": may}
        overflow = policy.overflow_policy or default_overflow

    tiers: list[ResolvedTier] = []
    seen: dict[tuple[str, str], str] = {}
    for requirement, specs in lists.items():
        for i, spec in enumerate(specs):
            where = f"StorePolicy.{requirement}[{i}]"
            key = (spec.tier, spec.scope)
            if key in seen:
                raise _fail(
                    where,
                    f"tier {spec.tier!r} with scope {spec.scope!r} appears twice "
                    f"(already in {seen[key]}); list each (tier, scope) once",
                    key,
                )
            seen[key] = where
            retention = spec.retention_policy
            if spec.tier == "stable_dram" and spec.scope == "local":
                if requirement == "must" and retention != "pinned":
                    raise _fail(
                        f"{where}.retention_policy",
                        "a 'must' local stable_dram tier requires retention_policy 'pinned'",
                        retention,
                    )
                retention = retention or "best_effort"
            tiers.append(
                ResolvedTier(
                    spec.tier,
                    spec.scope,
                    requirement,
                    retention,
                    spec.retention_ttl_ms,
                    spec.min_replicas,
                )
            )
    if overflow == "spill" and not any(
        t.tier == "shared_disk" and t.requirement in ("must", "should") for t in tiers
    ):
        raise _fail(
            "StorePolicy.overflow_policy",
            "overflow_policy 'spill' requires a shared_disk tier in must or should",
            overflow,
        )
    return ResolvedPolicy(tuple(tiers), overflow, policy.layout, profile)


def resolve_policy(policy: StorePolicy | None) -> ResolvedPolicy:
    """Expand and validate ``policy``; ``None`` means the ``cache`` profile."""
    if policy is None:
        policy = StorePolicy()
    elif not isinstance(policy, StorePolicy):
        raise _fail("policy", "must be a tensorcast_ray.StorePolicy or None", policy)
    return _expand(policy)


def plan_shards(total_bytes: int, tensor_sizes: Sequence[int], layout: str) -> list[list[int]]:
    """Group tensor indices into shards; tensors stay whole and in order.

    ``unsharded``, and ``auto`` up to :data:`SHARD_THRESHOLD_BYTES`, give one shard.  Above
    it, ``auto`` aims at shards of about 128 MiB; ``sharded`` (any size) aims at about
    64 MiB for more parallelism and smaller retries.  No shard grows past
    :data:`SHARD_MAX_BYTES` by grouping, but a single tensor bigger than that gets a shard
    of its own, and a shard can fall below :data:`SHARD_MIN_BYTES` only where tensor order
    leaves no neighbour to join.  The result always has at least one shard, possibly empty.
    ``total_bytes`` may exceed the tensors' sum (headers, alignment); it decides the count.
    """
    _check_choice("layout", layout, LAYOUTS)
    sizes = list(tensor_sizes)
    for i, size in enumerate(sizes):
        if not _is_int(size) or size < 0:
            raise _fail(f"tensor_sizes[{i}]", "must be a non-negative integer", size)
    if not _is_int(total_bytes) or total_bytes < sum(sizes):
        raise _fail(
            "total_bytes", "must be an integer of at least the sum of tensor_sizes", total_bytes
        )
    if layout == "unsharded" or (layout == "auto" and total_bytes <= SHARD_THRESHOLD_BYTES):
        return [list(range(len(sizes)))]
    if layout == "sharded":
        count = max(1, total_bytes // SHARD_MIN_BYTES)
    else:
        count = math.ceil(total_bytes / SHARD_THRESHOLD_BYTES)
    shards: list[list[int]] = []
    shard_bytes: list[int] = []
    current: list[int] = []
    current_bytes = 0
    left_bytes, left_shards = sum(sizes), count

    def close() -> None:
        nonlocal current, current_bytes, left_bytes, left_shards
        shards.append(current)
        shard_bytes.append(current_bytes)
        left_bytes -= current_bytes
        left_shards = max(1, left_shards - 1)
        current, current_bytes = [], 0

    for i, size in enumerate(sizes):
        # Re-aim after every shard so rounding spreads evenly instead of piling on the tail.
        target = left_bytes / left_shards
        grown = current_bytes + size
        # Close before adding when the cap forces it, or when stopping short lands nearer
        # the target than overshooting would.
        if current and (grown > SHARD_MAX_BYTES or target - current_bytes < grown - target):
            close()
        current.append(i)
        current_bytes += size
        if current_bytes >= target:
            close()
    if current or not shards:
        close()
    if (
        len(shards) > 1
        and shard_bytes[-1] < SHARD_MIN_BYTES
        and shard_bytes[-1] + shard_bytes[-2] <= SHARD_MAX_BYTES
    ):
        shards[-2].extend(shards.pop())
    return shards
