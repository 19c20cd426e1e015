"""Weight sync: a versioned Publisher and Subscribers woken by the store.  [SDK]

A trainer publishes ``name:<n>`` every step; every subscriber, on any node, wakes as soon as
the version commits (the daemon holds its ``WaitLatest`` call open and the Global Store wakes
the daemon: no polling), and copies it into its model from the node's shared memory: one copy
per node, pulled once whatever the number of subscribers there. A subscriber copying a version
holds it, so the publisher's garbage collection (``keep_last``) passes it by until the copy is
done. Framework-free: the vLLM backend (``tensorcast_ray.integrations.vllm``) is built on it.

Walk-through: [trainer] ``Publisher.publish(sd)`` → ``put`` (or zero-copy ``register`` of
``tc.empty`` tensors) of ``policy:8`` → ``replicate`` to the nodes with subscribers (a chain:
the trainer's node sends the bytes about once) → GC of versions beyond ``keep_last`` that no
reader holds; [rollout] ``Subscriber.wait_for()`` returns ``policy:8`` →
``Subscriber.pull(model)``: hold ``policy:8``, map it (already on this node), check every name,
shape and dtype, copy, release.

Pure rules (:func:`next_version`, :func:`gc_candidates`, :func:`is_newer`) are tested without
Ray.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from tensorcast_ray._catalog import LATEST, parse_key
from tensorcast_ray._errors import (
    ArtifactError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from tensorcast_ray._policy import StorePolicy
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

if TYPE_CHECKING:
    import torch

    from tensorcast_ray._store import Store

logger = logging.getLogger(__name__)

__all__ = [
    "Publisher",
    "Subscriber",
    "UpdateHandle",
    "gc_candidates",
    "is_newer",
    "next_version",
    "reading",
]

#: one held WaitLatest call lasts at most this long (the daemon caps it at 10 s too)
_WAIT_CALL_S = 10.0
#: how long a reader's hold lasts if it is never released (a crashed subscriber)
DEFAULT_HOLD_TTL_S = 600.0


# ---- pure rules -----------------------------------------------------------------------------
def _int_version(key: str) -> int | None:
    version = parse_key(key)[1]
    return int(version) if version.isdigit() else None


def next_version(existing: Sequence[str], last: int | None) -> int:
    """The next integer version: one past the largest integer version among ``existing``
    keys and ``last`` (what this publisher wrote), starting at 1."""
    numbers = [n for n in (_int_version(k) for k in existing) if n is not None]
    if last is not None:
        numbers.append(last)
    return max(numbers, default=0) + 1


def gc_candidates(published: Sequence[str], keep_last: int) -> list[str]:
    """The versions to delete, oldest first: all but the newest ``keep_last`` of
    ``published`` (in publish order)."""
    if keep_last < 1:
        raise InvalidArgumentError(f"keep_last must be >= 1, got {keep_last!r}")
    return list(published[:-keep_last])


def is_newer(key: str, than: str | None) -> bool:
    """Whether ``key`` is a version to hand a subscriber that has ``than``: any other version,
    except an integer version not above an integer ``than`` (``latest`` moving back after a
    delete is not an update)."""
    if than is None or than == "":
        return True
    if key == than:
        return False
    a, b = _int_version(key), _int_version(than)
    return a is None or b is None or a > b


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or ":" in name:
        raise InvalidArgumentError(
            f"name must be an artifact name without a version (e.g. 'policy'), got {name!r}"
        )
    parse_key(f"{name}:{LATEST}")
    return name


def _default_store() -> Store:
    from tensorcast_ray._store import default_store

    return default_store()


# ---- reader holds ------------------------------------------------------------------------------
@contextlib.contextmanager
def reading(
    key: str, *, ttl_s: float = DEFAULT_HOLD_TTL_S, store: Store | None = None
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Hold a version while you read it: yields ``(concrete key, tensors)``, the tensors
    read-only zero-copy views of this node's shared memory (pulled once per node when the
    version lives on another node). ``name:latest`` is resolved and held in one step. While
    inside, a publisher's garbage collection does not delete the version; the hold ends on
    exit (or after ``ttl_s`` if this process dies)."""
    with _reading(key, ttl_s, store) as (concrete, _, tensors):
        yield concrete, tensors


@contextlib.contextmanager
def _reading(
    key: str, ttl_s: float, store: Store | None
) -> Iterator[tuple[str, Any, dict[str, torch.Tensor]]]:
    """:func:`reading`, also yielding the Artifact."""
    st = store if store is not None else _default_store()
    held = _hold(st, key, ttl_s)
    try:
        art = st.artifact(artifact_id=held.artifact_id)
        yield held.key, art, art.tensor_dict()
    finally:
        _release(st, held.hold_id)


def _hold(st: Store, key: str, ttl_s: float) -> daemon_pb2.HoldVersionResponse:
    """Take a reader hold on ``key`` (``name:latest`` resolved in the same step): its
    concrete ``key``, ``artifact_id`` and ``hold_id`` (for :func:`_release`)."""
    parse_key(key)
    if isinstance(ttl_s, bool) or not (isinstance(ttl_s, (int, float)) and ttl_s > 0):
        raise InvalidArgumentError(f"ttl_s must be a number of seconds > 0, got {ttl_s!r}")
    request = daemon_pb2.HoldVersionRequest(key=key, ttl_s=float(ttl_s))
    with st._verb("hold"):
        return st._retrier.call("hold", lambda t: st._call_in_session("HoldVersion", request, t))


def _release(st: Store, hold_id: str) -> None:
    request = daemon_pb2.ReleaseHoldRequest(hold_id=hold_id)
    try:
        st._retrier.call("hold", lambda t: st._call_in_session("ReleaseHold", request, t))
    except ArtifactError as exc:  # it ends at its ttl, or with this session
        logger.warning("could not release reader hold %s: %s", hold_id, exc.message)


# ---- Publisher -------------------------------------------------------------------------------
class Publisher:
    """Publish versions of ``name``: ``publish(state_dict)`` writes ``name:<n>`` (``n`` one past
    the largest integer version in the cluster, unless given), which ``name:latest`` then
    names; returns the key.

    - Tensors that all lie in ``tc.empty`` buffers are registered with no copy (they live
      while this process keeps its session); others are put once.
    - ``replicate=True``: in a cluster the new version is sent to every other node with a
      subscriber of ``name`` (``tc.replicate(key, nodes="subscribers")``): along a chain, so
      the bytes leave this node about once, and a node's subscribers then read it locally.
    - Versions beyond the newest ``keep_last`` are deleted, except one a subscriber holds
      while copying it; that one is deleted at a later ``publish`` (or :meth:`gc`) once free.
      Only versions this publisher wrote or found at start (integer versions) are collected.
    """

    def __init__(
        self,
        name: str,
        *,
        keep_last: int = 2,
        policy: StorePolicy | None = None,
        replicate: bool = True,
        store: Store | None = None,
    ) -> None:
        self.name = _check_name(name)
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise InvalidArgumentError(f"keep_last must be an int >= 1, got {keep_last!r}")
        if policy is not None and not isinstance(policy, StorePolicy):
            raise InvalidArgumentError("policy must be a tensorcast_ray.StorePolicy or None")
        self.keep_last = keep_last
        self.policy = policy
        self.replicate = bool(replicate)
        self._store = store if store is not None else _default_store()
        existing = self._store.list_keys(f"{self.name}:")
        numbered = sorted((n, k) for k in existing if (n := _int_version(k)) is not None)
        # Oldest first: what GC may delete (integer versions found, then what we publish).
        self._published: list[str] = [k for _, k in numbered]
        self._last: int | None = numbered[-1][0] if numbered else None
        self._lock = threading.Lock()
        self._buffers: dict[str, set[str]] = {}  # registered version -> its tc.empty buffers
        self.last_replication: dict[str, Any] = {}

    def _live_buffers(self) -> set[str]:
        """The tc.empty buffers behind versions this publisher registered and still keeps."""
        live = set(self._published)  # named versions are never collected: always kept
        for key in [k for k in self._buffers if k not in live and _int_version(k) is not None]:
            del self._buffers[key]
        return set().union(*self._buffers.values()) if self._buffers else set()

    @property
    def versions(self) -> list[str]:
        """The versions this publisher still keeps track of, oldest first."""
        with self._lock:
            return list(self._published)

    def publish(self, state_dict: Mapping[str, Any], version: int | str | None = None) -> str:
        """Write the next version (or ``version``), replicate it to subscriber nodes, collect
        old versions; returns its key. Integer versions must increase."""
        from tensorcast_ray._metrics import get_sdk_metrics

        start = time.perf_counter()
        key = self._publish(state_dict, version)
        self.gc()
        get_sdk_metrics().weights_publish.observe(time.perf_counter() - start)
        return key

    def _publish(self, state_dict: Mapping[str, Any], version: int | str | None) -> str:
        from tensorcast_ray._write import _buffer_refs

        with self._lock:
            if version is None:
                number: int | None = next_version(
                    self._store.list_keys(f"{self.name}:"), self._last
                )
                text = str(number)
            elif isinstance(version, bool) or not isinstance(version, (int, str)):
                raise InvalidArgumentError(
                    f"version must be an int, a str or None, got {type(version).__name__}"
                )
            else:
                text = str(version)
                number = int(text) if text.isdigit() else None
                if number is not None and self._last is not None and number <= self._last:
                    raise InvalidArgumentError(
                        f"version {number} of {self.name!r} is not above the last one "
                        f"({self._last}); integer versions must increase (pass None for the next)"
                    )
            key = f"{self.name}:{text}"
            parse_key(key, for_write=True)
            if not isinstance(state_dict, Mapping):
                raise InvalidArgumentError(
                    f"publish takes a mapping of name to tensor, got {type(state_dict).__name__}"
                )
            refs = _buffer_refs(self._store, state_dict) if state_dict else None
            buffers = set(refs[0]) if refs is not None else set()
            if buffers and buffers & self._live_buffers():
                # Those buffers back a version still kept: registering them again would make
                # two versions one memory (readers of the older would see the newer's bytes).
                logger.warning(
                    "publish %s: its tc.empty buffers back an earlier version still kept; "
                    "copying it (publish each step from fresh buffers for zero-copy)",
                    key,
                )
                buffers = set()
            if buffers:
                self._store.register(state_dict, key, policy=self.policy)
                self._buffers[key] = buffers
            else:
                self._store.put(state_dict, key, policy=self.policy)
            if number is not None:
                self._last = number
                self._published.append(key)
            self._replicate(key)
        return key

    def _replicate(self, key: str) -> None:
        from tensorcast_ray import _bootstrap

        hello = _bootstrap.current().client.hello
        if not self.replicate or hello is None or not hello.global_store_address:
            return
        try:
            results = self._store.replicate(key, nodes="subscribers")
        except ArtifactError as exc:  # subscribers then pull it on their first read
            logger.warning("replicating %s to its subscribers failed: %s", key, exc.message)
            self.last_replication = {"key": key, "error": exc.message}
            return
        failed = {n: r.reason for n, r in results.items() if r.status != "ready"}
        if failed:
            logger.warning("replicating %s: %d node(s) failed: %s", key, len(failed), failed)
        self.last_replication = {"key": key, "nodes": sorted(results), "failed": failed}

    def gc(self) -> list[str]:
        """Delete the versions beyond ``keep_last`` that no subscriber holds; returns the
        keys deleted. Held ones stay listed and are tried again at the next call."""
        with self._lock:
            candidates = gc_candidates(self._published, self.keep_last)
        from tensorcast_ray._metrics import get_sdk_metrics

        counter = get_sdk_metrics().weights_gc
        deleted: list[str] = []
        for key in candidates:
            try:
                self._store.delete(key, unless_held=True)
                counter.labels(outcome="deleted").inc()
            except NotFoundError:
                pass  # deleted by someone else: forget it
            except FailedPreconditionError:
                counter.labels(outcome="held").inc()
                continue  # a subscriber is copying it
            except ArtifactError as exc:
                logger.warning("deleting old version %s failed: %s", key, exc.message)
                continue
            deleted.append(key)
            with self._lock:
                if key in self._published:
                    self._published.remove(key)
        return deleted

    def close(self) -> None:
        """One last collection (versions still held stay)."""
        self.gc()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- Subscriber ------------------------------------------------------------------------------
class Subscriber:
    """Follow the versions of ``name`` from any process of the cluster.

    ``wait_for`` blocks until a newer version commits anywhere (woken by the store, never
    polling); ``on_update`` runs a callback for each new version on a thread; ``pull`` copies
    a version into a module or a dict of tensors, checking every name, shape and dtype before
    the first byte moves. Subscribers on one node share one copy of each version."""

    def __init__(
        self, name: str, *, hold_ttl_s: float = DEFAULT_HOLD_TTL_S, store: Store | None = None
    ) -> None:
        self.name = _check_name(name)
        if isinstance(hold_ttl_s, bool) or not (
            isinstance(hold_ttl_s, (int, float)) and hold_ttl_s > 0
        ):
            raise InvalidArgumentError(f"hold_ttl_s must be seconds > 0, got {hold_ttl_s!r}")
        self.hold_ttl_s = float(hold_ttl_s)
        self._store = store if store is not None else _default_store()
        #: the last version this subscriber returned from wait_for or pulled
        self.seen: str | None = None

    def _wait_call(self, after: str, wait_s: float, cancel: _Cancel | None) -> tuple[str, bool]:
        """One held WaitLatest call: ``(latest key, changed)``."""
        from tensorcast_ray import _bootstrap
        from tensorcast_ray._error_mapping import from_grpc_error

        request = daemon_pb2.WaitLatestRequest(name=self.name, after_key=after, wait_s=wait_s)

        def attempt(_: float) -> daemon_pb2.WaitLatestResponse | None:
            client = _bootstrap.current().client
            future = client.start_call("WaitLatest", request, timeout=wait_s + 30.0)
            if cancel is not None and not cancel.attach(future):
                future.cancel()
            try:
                return future.result()
            except grpc.FutureCancelledError:
                return None  # UpdateHandle.close(): not a failure to retry
            except grpc.RpcError as exc:
                raise from_grpc_error(exc, target=client.address) from exc
            finally:
                if cancel is not None:
                    cancel.detach()

        resp = self._store._retrier.call("wait_for", attempt)
        if resp is None:
            raise _Cancelled
        return resp.key, resp.changed

    def latest(self) -> str | None:
        """The version ``name:latest`` names now, or None when there is none."""
        key, _ = self._wait_call("", 0.0, None)
        return key or None

    def wait_for(self, newer_than: str | None = None, timeout: float | None = None) -> str:
        """Block until a version newer than ``newer_than`` (default: the last one this
        subscriber returned or pulled; none yet: any version) is committed anywhere in the
        cluster, and return its key — at once if one is already there. DEADLINE_EXCEEDED
        after ``timeout`` seconds (None: no limit)."""
        with self._store._verb("wait_for"):
            return self._wait(newer_than, timeout, None)

    def _wait(
        self,
        newer_than: str | None,
        timeout: float | None,
        cancel: _Cancel | None,
        track: bool = True,
    ) -> str:
        """``track``: remember the version returned in ``seen`` (an UpdateHandle keeps its
        own, so it never moves what ``wait_for`` returns next)."""
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
        ):
            raise InvalidArgumentError(f"timeout must be seconds >= 0 or None, got {timeout!r}")
        than = newer_than if newer_than is not None else self.seen
        if than:
            if parse_key(than)[0] != self.name:
                raise InvalidArgumentError(f"{than!r} is not a version of {self.name!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        after = than or ""
        while True:
            remaining = _WAIT_CALL_S if deadline is None else deadline - time.monotonic()
            try:
                key, _ = self._wait_call(after, max(0.0, min(remaining, _WAIT_CALL_S)), cancel)
            except UnavailableError:
                # The daemon or Global Store away past a call's retries: a wait waits on.
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                key = ""
            if key and is_newer(key, than):
                if track:
                    self.seen = key
                return key
            if key:
                after = key  # latest moved back (a delete): wait past what it names now
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceededError(
                    f"no version of {self.name!r} newer than {than or '(none)'} was committed "
                    f"within {timeout} s"
                )

    def on_update(
        self, callback: Callable[[str], Any], *, include_current: bool = False
    ) -> UpdateHandle:
        """Call ``callback(key)`` from a background thread for each version committed from
        now on (``include_current``: first for the version ``latest`` names now). A version
        superseded while the callback still runs is skipped: the next call gets the newest.
        Exceptions from the callback are logged; the handle's ``close()`` stops it."""
        if not callable(callback):
            raise InvalidArgumentError("callback must be callable, taking the new key")
        start = "" if include_current else (self.latest() or "")
        return UpdateHandle(self, callback, start)

    def reading(
        self, key: str | None = None
    ) -> contextlib.AbstractContextManager[tuple[str, dict[str, torch.Tensor]]]:
        """:func:`reading` of ``key`` (default: ``name:latest``) with this subscriber's hold ttl."""
        return reading(self._key(key), ttl_s=self.hold_ttl_s, store=self._store)

    def _key(self, key: str | None) -> str:
        if key is None:
            return f"{self.name}:{LATEST}"
        if parse_key(key)[0] != self.name:
            raise InvalidArgumentError(f"{key!r} is not a version of {self.name!r}")
        return key

    def pull(
        self,
        into: Any,
        *,
        key: str | None = None,
        names: Sequence[str] | None = None,
        rename: Mapping[str, str] | Callable[[str], str] | None = None,
    ) -> str:
        """Copy a version (default: ``latest``) into ``into``: a ``torch.nn.Module`` (its
        parameters and persistent buffers by ``state_dict`` name) or a dict of tensors.
        ``names``: only these tensors of the version (default: all, and then every target
        must be covered); ``rename``: the version's name → the target's. Every name, shape
        and dtype is checked before anything is copied (INVALID_ARGUMENT naming the tensor).
        Returns the key pulled."""
        from tensorcast_ray._artifact import _copy_into_targets, _validate_targets
        from tensorcast_ray._metrics import get_sdk_metrics

        start = time.perf_counter()
        targets = _targets_of(into)
        if names is not None and (isinstance(names, str) or not isinstance(names, Sequence)):
            raise InvalidArgumentError("names must be a list of tensor names")
        if rename is not None and not (isinstance(rename, Mapping) or callable(rename)):
            raise InvalidArgumentError("rename must be a mapping or a callable")
        with _reading(self._key(key), self.hold_ttl_s, self._store) as (concrete, art, tensors):
            chosen = list(tensors) if names is None else list(names)
            missing = [n for n in chosen if n not in tensors]
            if missing:
                raise InvalidArgumentError(
                    f"{concrete} has no tensor named {missing[0]!r}; it holds {len(tensors)} "
                    f"tensors, e.g. {list(tensors)[:5]}"
                )
            mapped = {n: _renamed(n, rename) for n in chosen}
            if len(set(mapped.values())) < len(mapped):
                seen_t: dict[str, str] = {}
                for n, t in mapped.items():
                    if t in seen_t:
                        raise InvalidArgumentError(
                            f"rename maps both {seen_t[t]!r} and {n!r} to target {t!r}"
                        )
                    seen_t[t] = n
            absent = [t for t in mapped.values() if t not in targets]
            if absent:
                raise InvalidArgumentError(
                    f"the target has no tensor named {absent[0]!r} (from {concrete}); it has "
                    f"{len(targets)}, e.g. {list(targets)[:5]} — pass rename= or names="
                )
            if names is None:
                _check_covered(concrete, targets, set(mapped.values()))
            chosen_targets = {t: targets[t] for t in mapped.values()}
            expected = {mapped[n]: _spec(tensors[n]) for n in chosen}
            _validate_targets(concrete, chosen_targets, expected)
            _copy_into_targets(chosen_targets, [(mapped[n], tensors[n]) for n in chosen])
            committed_ms = int(art._entry.info.created_unix_ms)
        metrics = get_sdk_metrics()
        metrics.weights_pull.observe(time.perf_counter() - start)
        if committed_ms:
            metrics.weights_lag.observe(max(0.0, time.time() - committed_ms / 1000))
        self.seen = concrete
        return concrete


class _Cancelled(Exception):
    """A held wait ended by UpdateHandle.close()."""


class _Cancel:
    """The in-flight wait of an UpdateHandle, so close() can end it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._future: Any = None
        self.stopped = threading.Event()

    @property
    def closed(self) -> bool:
        return self.stopped.is_set()

    def attach(self, future: Any) -> bool:
        with self._lock:
            self._future = future
            return not self.closed

    def detach(self) -> None:
        with self._lock:
            self._future = None

    def close(self) -> None:
        with self._lock:
            self.stopped.set()
            if self._future is not None:
                self._future.cancel()


class UpdateHandle:
    """A running :meth:`Subscriber.on_update`; ``close()`` stops it (and waits for a callback
    in progress, unless called from inside it)."""

    def __init__(self, sub: Subscriber, callback: Callable[[str], Any], start: str) -> None:
        self._sub = sub
        self._callback = callback
        self._last = start
        self._cancel = _Cancel()
        self.calls = 0
        self._thread = threading.Thread(
            target=self._run, name=f"tc-weights-{sub.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        backoff = 0.5
        while not self._cancel.closed:
            try:
                key = self._sub._wait(self._last, None, self._cancel, track=False)
            except _Cancelled:
                return
            except ArtifactError as exc:  # the daemon away for longer than a retry covers
                from tensorcast_ray import _bootstrap

                if not _bootstrap.is_initialized():  # tc.shutdown(): nothing to follow
                    logger.info("on_update of %s ends: tensorcast was shut down", self._sub.name)
                    return
                logger.warning("on_update of %s: %s", self._sub.name, exc.message)
                if self._cancel.stopped.wait(backoff):
                    return
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            self._last = key
            if self._cancel.closed:
                return
            try:
                self._callback(key)
            except Exception:
                logger.exception("on_update callback for %s failed", key)
            self.calls += 1

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        self._cancel.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> UpdateHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _targets_of(into: Any) -> dict[str, Any]:
    import torch

    if isinstance(into, torch.nn.Module):
        # Tensors only: a module's extra state (get_extra_state) is not weights.
        return {
            k: v for k, v in into.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)
        }
    if isinstance(into, Mapping):
        bad = [k for k, v in into.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise InvalidArgumentError(
                f"target {bad[0]!r} is a {type(into[bad[0]]).__name__}, not a torch.Tensor"
            )
        return dict(into)
    raise InvalidArgumentError(
        f"pull copies into a torch.nn.Module or a dict of tensors, got {type(into).__name__}"
    )


def _renamed(name: str, rename: Mapping[str, str] | Callable[[str], str] | None) -> str:
    if rename is None:
        return name
    out = rename.get(name, name) if isinstance(rename, Mapping) else rename(name)
    if not isinstance(out, str):
        raise InvalidArgumentError(f"rename of {name!r} gave {out!r}, not a str")
    return out


def _spec(tensor: Any) -> tuple[str, tuple[int, ...]]:
    from tensorcast_ray._dtypes import dtype_name

    return dtype_name(tensor.dtype), tuple(tensor.shape)


def _check_covered(key: str, targets: Mapping[str, Any], covered: set[str]) -> None:
    """A whole pull must reach every target: a tensor left out (tied weights aside: one
    storage, reached through another name) would keep its old value unnoticed."""
    reached = {t.data_ptr() for n, t in targets.items() if n in covered and t.numel()}
    left = [
        n
        for n, t in targets.items()
        if n not in covered and not (t.numel() and t.data_ptr() in reached)
    ]
    if left:
        raise InvalidArgumentError(
            f"{key} does not hold {len(left)} of the target's tensors, e.g. {left[:5]}; pass "
            "names= to pull only some tensors, or rename= if the names differ"
        )
