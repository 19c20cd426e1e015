"""Ray Serve: replicas on a node share one copy of the weights and hot-swap versions.  [SDK]

Today each Serve replica loads its own copy of a model. A :class:`SharedWeights` in a
deployment's ``__init__`` maps the version ``name:latest`` names from the node's shared memory
instead (zero-copy, read-only; pulled to the node once whatever the number of replicas), builds
the model over those tensors (``build``; :func:`module_builder` makes a ``torch.nn.Module``
whose parameters *are* the shared tensors), and follows the name: each version a
:class:`tensorcast_ray.weights.Publisher` publishes is mapped and built on a background thread
(woken by the store, no polling) and swapped in between requests, with no restart.

A request takes one version for its whole life: ``with weights.use() as w:`` pins ``w`` (its
``key``, ``tensors`` and ``model``); a swap meanwhile changes what the *next* request gets, and
the version in use stays held (a publisher's garbage collection passes it by) until the last
request using it ends. ``use(at_least=...)`` gives a client monotonic versions across replicas
(send the highest version you have seen: a replica behind swaps forward first), and
``use(version=...)`` pins an exact version (model composition: the ingress passes the version
it used to the deployments it calls, so a whole request sees one version).

Walk-through, one replica: [``__init__``] hold ``policy:latest`` → ``policy:7`` (resolved and
held in one step), map it, ``build`` → serve; [publisher] ``policy:8`` commits → [background]
hold ``policy:8``, map, ``build``, swap; requests still inside ``use()`` finish on ``policy:7``,
the last one out releases its hold. Needs the ``serve`` extra only for Serve itself: this module
imports neither Serve nor torch at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from tensorcast_ray._catalog import parse_key
from tensorcast_ray._errors import (
    ArtifactError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from tensorcast_ray._weights import (
    DEFAULT_HOLD_TTL_S,
    Subscriber,
    UpdateHandle,
    _check_name,
    _hold,
    _int_version,
    _release,
    is_newer,
)

if TYPE_CHECKING:
    import torch

    from tensorcast_ray._store import Store

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_VERSION_HEADER",
    "VERSION_HEADER",
    "SharedWeights",
    "Weights",
    "module_builder",
]

#: the response header that names the version a request was served with (``policy:8``)
VERSION_HEADER = "x-tensorcast-version"
#: the request header a client sends with the highest version it has seen (``use(at_least=)``)
MIN_VERSION_HEADER = "x-tensorcast-min-version"


@dataclass(frozen=True, eq=False)
class Weights:
    """One version as a replica serves it: ``key`` (``name:version``), ``version``, the
    read-only zero-copy ``tensors`` of this node's shared memory and the ``model`` ``build``
    made over them (None without ``build``). Never write to them in place: the pages are
    mapped read-only and a write is a segmentation fault (docs/data-plane.md)."""

    key: str
    tensors: Mapping[str, torch.Tensor]
    model: Any
    #: seconds from taking the hold to the model built (mapping included)
    load_s: float

    @property
    def version(self) -> str:
        return parse_key(self.key)[1]

    @property
    def headers(self) -> dict[str, str]:
        """``{VERSION_HEADER: key}``, for an HTTP response."""
        return {VERSION_HEADER: self.key}


@dataclass(eq=False)
class _Entry:
    weights: Weights
    hold_id: str
    users: int = 0
    #: no longer current (or never was: a pinned version); released when users reach 0
    retired: bool = False
    released: bool = False


def module_builder(
    factory: Callable[[], torch.nn.Module], *, init_device: str = "meta", strict: bool = True
) -> Callable[[Mapping[str, torch.Tensor]], torch.nn.Module]:
    """A ``build`` for :class:`SharedWeights` that makes ``factory()``'s module over the
    shared tensors with no copy (``load_state_dict(assign=True)``), in eval mode with
    ``requires_grad`` off.

    ``init_device="meta"`` (default) constructs the module with no memory at all; a module
    whose ``__init__`` computes non-persistent buffers (rotary tables…) needs
    ``init_device="cpu"``: it is built normally, then every published tensor replaces its own
    (the private copies are freed). A parameter or buffer the version does not provide is
    FAILED_PRECONDITION (``strict=False`` allows missing names only with ``init_device="cpu"``).
    """
    if init_device not in ("meta", "cpu"):
        raise InvalidArgumentError(f"init_device must be 'meta' or 'cpu', got {init_device!r}")
    if not callable(factory):
        raise InvalidArgumentError("factory must be callable, returning a torch.nn.Module")

    def build(tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        import torch

        with torch.device(init_device):
            module = factory()
        if not isinstance(module, torch.nn.Module):
            raise InvalidArgumentError(
                f"factory returned {type(module).__name__}, not a torch.nn.Module"
            )
        try:
            module.load_state_dict(dict(tensors), strict=strict, assign=True)
        except RuntimeError as exc:
            raise FailedPreconditionError(
                f"the published tensors do not fit the module: {exc}"
            ) from exc
        on_meta = [
            n
            for n, t in (*module.named_parameters(), *module.named_buffers())
            if t.device.type == "meta"
        ]
        if on_meta:
            raise FailedPreconditionError(
                f"{len(on_meta)} tensors of the module are not in the published version "
                f"(e.g. {on_meta[0]!r}; non-persistent buffers are never published): build "
                "it with init_device='cpu' so its __init__ computes them"
            )
        module.eval()
        module.requires_grad_(False)
        return module

    return build


def _as_key(name: str, value: int | str | None, what: str) -> str | None:
    """``value`` (an int, ``"7"`` or ``"name:7"``; None or ``""``: none) as ``name:7``."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgumentError(f"{what} must be a version (int or str), got {value!r}")
    text = str(value).strip()
    key = text if ":" in text else f"{name}:{text}"
    key_name, _ = parse_key(key, for_write=True)
    if key_name != name:
        raise InvalidArgumentError(f"{what} {value!r} is not a version of {name!r}")
    return key


class SharedWeights:
    """The weights of ``name`` as every replica on a node shares them, swapped to each new
    version between requests.

    Made in a deployment's ``__init__`` (after ``tc.init()``, or it calls ``tc.init()``): waits
    up to ``timeout_s`` for a first version (None: as long as it takes), maps it and calls
    ``build(tensors)`` (e.g. :func:`module_builder`). ``follow=False`` keeps the first version
    for good. ``hold_ttl_s``: each held version's hold is renewed well before this; it only
    matters if the process hangs (a process that dies releases its holds at once).
    ``on_swap(weights)`` is called on the background thread after each swap.
    """

    def __init__(
        self,
        name: str,
        *,
        build: Callable[[Mapping[str, torch.Tensor]], Any] | None = None,
        follow: bool = True,
        timeout_s: float | None = 60.0,
        hold_ttl_s: float = DEFAULT_HOLD_TTL_S,
        on_swap: Callable[[Weights], Any] | None = None,
        store: Store | None = None,
    ) -> None:
        from tensorcast_ray import _bootstrap

        self.name = _check_name(name)
        if build is not None and not callable(build):
            raise InvalidArgumentError("build must be callable: build(tensors) -> model")
        if on_swap is not None and not callable(on_swap):
            raise InvalidArgumentError("on_swap must be callable: on_swap(weights)")
        if store is None and not _bootstrap.is_initialized():
            import tensorcast_ray as tc

            tc.init()
        self._build = build
        self._on_swap = on_swap
        self._sub = Subscriber(name, hold_ttl_s=hold_ttl_s, store=store)
        self._store = self._sub._store
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}  # every held version: current, in use, pinned
        self._closed = False
        self._stop = threading.Event()
        #: how many swaps this replica made, and the last background failure (None: none)
        self.swaps = 0
        self.last_error: str | None = None
        self._sub.wait_for(timeout=timeout_s)  # a first version exists (anywhere)
        # latest resolved and held in one step: never a version deleted since the wait
        self._current = self._load(f"{name}:latest")
        self._entries[self._current.weights.key] = self._current
        self._handle: UpdateHandle | None = None
        if follow:
            self._handle = UpdateHandle(self._sub, self._on_update, self._current.weights.key)
        self._renewer = threading.Thread(
            target=self._renew_loop, name=f"tc-serve-holds-{name}", daemon=True
        )
        self._renewer.start()

    # ---- what a request uses ------------------------------------------------------------------
    @property
    def current(self) -> Weights:
        """The version new requests get now (not pinned: prefer :meth:`use`)."""
        return self._current.weights

    @property
    def key(self) -> str:
        return self._current.weights.key

    @contextlib.contextmanager
    def use(
        self, *, at_least: int | str | None = None, version: int | str | None = None
    ) -> Iterator[Weights]:
        """Pin one version for a request: the current one; with ``at_least`` (an integer
        version, e.g. a client's ``MIN_VERSION_HEADER``), that or a newer one (a replica behind
        swaps forward first, waiting up to 30 s for it); with ``version``, exactly that one
        (held for the request if it is not the current one; NOT_FOUND once deleted). A swap
        meanwhile never changes what the ``with`` block sees."""
        entry = self._acquire(at_least, version)
        try:
            yield entry.weights
        finally:
            self._leave(entry)

    @contextlib.asynccontextmanager
    async def use_async(
        self, *, at_least: int | str | None = None, version: int | str | None = None
    ) -> AsyncIterator[Weights]:
        """:meth:`use` for ``async`` handlers: a version that must be loaded first is loaded
        on a thread, so the replica's event loop keeps serving meanwhile."""
        entry = self._acquire_nowait(at_least, version)
        if entry is None:
            loading = asyncio.ensure_future(asyncio.to_thread(self._acquire, at_least, version))
            try:
                entry = await asyncio.shield(loading)
            except asyncio.CancelledError:
                # The request is gone (e.g. its client disconnected) but its thread goes on
                # loading: what it pins is left the moment it is pinned.
                loading.add_done_callback(self._leave_loaded)
                raise
        try:
            yield entry.weights
        finally:
            self._leave(entry)

    def _leave_loaded(self, loading: asyncio.Future[_Entry]) -> None:
        if not loading.cancelled() and loading.exception() is None:
            self._leave(loading.result())

    def _acquire_nowait(
        self, at_least: int | str | None, version: int | str | None
    ) -> _Entry | None:
        """The entry to pin when no load is needed, else None."""
        want = _as_key(self.name, version, "version")
        floor = self._floor(at_least)
        with self._lock:
            self._check_open()
            if want is not None:
                entry = self._entries.get(want)
            else:
                entry = self._current
                if floor is not None and is_newer(floor, entry.weights.key):
                    entry = None
            if entry is not None:
                entry.users += 1
            return entry

    def _acquire(self, at_least: int | str | None, version: int | str | None) -> _Entry:
        entry = self._acquire_nowait(at_least, version)
        if entry is not None:
            return entry
        want = _as_key(self.name, version, "version")
        if want is not None:  # a pinned version this replica does not hold
            loaded = self._load(want)
            with self._lock:
                held = self._entries.get(want)
                if held is not None:  # another request (or a swap) won the race
                    held.users += 1
                    self._retire(loaded)
                    return held
                loaded.retired = True  # never current: released when its last request ends
                self._entries[want] = loaded
                loaded.users += 1
                return loaded
        floor = self._floor(at_least)
        assert floor is not None
        key = self._sub._wait(
            _predecessor(floor), 30.0, None, track=False
        )  # latest is at least the floor at once, unless it was deleted meanwhile
        if _int_version(key) is None:
            raise FailedPreconditionError(
                f"{self.name}:latest is {key}, a named version, and at_least compares integer "
                "versions only: pin it with version= instead"
            )
        self._swap(self._load(key))
        entry = self._acquire_nowait(at_least, None)
        if entry is None:
            raise DeadlineExceededError(
                f"{self.name!r}: no version at least {floor} could be loaded on this replica"
            )
        return entry

    def _floor(self, at_least: int | str | None) -> str | None:
        floor = _as_key(self.name, at_least, "at_least")
        if floor is not None and _int_version(floor) is None:
            raise InvalidArgumentError(
                f"at_least must be an integer version (versions a Publisher numbers), got "
                f"{at_least!r}; pin a named version with version= instead"
            )
        return floor

    def _leave(self, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            if entry.retired:
                self._retire(entry)  # the last user of a retired version releases it

    # ---- loading and swapping ------------------------------------------------------------------
    def _load(self, key: str) -> _Entry:
        """Hold ``key``, map it, build the model: a new entry (not yet in ``_entries``)."""
        start = time.perf_counter()
        held = _hold(self._store, key, self._sub.hold_ttl_s)
        try:
            tensors = self._store.artifact(artifact_id=held.artifact_id).tensor_dict()
            model = self._build(tensors) if self._build is not None else None
        except BaseException:
            _release(self._store, held.hold_id)
            raise
        weights = Weights(
            key=held.key,
            tensors=MappingProxyType(tensors),
            model=model,
            load_s=time.perf_counter() - start,
        )
        return _Entry(weights=weights, hold_id=held.hold_id)

    def _on_update(self, key: str) -> None:
        """[background] A newer version committed: load and swap it in."""
        from tensorcast_ray._metrics import get_sdk_metrics

        metrics = get_sdk_metrics()
        start = time.perf_counter()
        if not is_newer(key, self._current.weights.key):
            return
        try:
            entry = self._load(key)
        except Exception as exc:  # a failed load (or build) never stops serving the current one
            self.last_error = exc.message if isinstance(exc, ArtifactError) else repr(exc)
            metrics.serve_swaps.labels(outcome="failed").inc()
            logger.warning(
                "%s: could not load %s, serving %s on: %s",
                self.name,
                key,
                self.key,
                self.last_error,
            )
            return
        if self._swap(entry):
            metrics.serve_swap.observe(time.perf_counter() - start)
            if self._on_swap is not None:
                try:
                    self._on_swap(entry.weights)
                except Exception:
                    logger.exception("on_swap callback for %s failed", key)

    def _swap(self, entry: _Entry) -> bool:
        """Make ``entry`` current if it is newer; False (and released) otherwise."""
        from tensorcast_ray._metrics import get_sdk_metrics

        with self._lock:
            key = entry.weights.key
            newer = not self._closed and is_newer(key, self._current.weights.key)
            held = self._entries.get(key)
            if newer and held is not None:  # pinned by a request already: reuse that entry
                self._retire(entry)
                entry = held
            if not newer:
                self._retire(entry)
                return False
            old, self._current = self._current, entry
            self._entries[key] = entry
            entry.retired = False
            self._retire(old)
            self.swaps += 1
        get_sdk_metrics().serve_swaps.labels(outcome="swapped").inc()
        logger.info("%s: serving %s (was %s)", self.name, key, old.weights.key)
        return True

    def _retire(self, entry: _Entry) -> None:
        """[under the lock] ``entry`` is no longer current: released now if no request uses
        it, else by the last one to leave. Releasing happens on a thread: never under the
        lock, never on a request's path."""
        entry.retired = True
        if entry.users == 0 and not entry.released:
            self._drop(entry)
            threading.Thread(target=self._release_hold, args=(entry,), daemon=True).start()

    def _drop(self, entry: _Entry) -> None:
        entry.released = True
        if self._entries.get(entry.weights.key) is entry:
            del self._entries[entry.weights.key]

    def _release_hold(self, entry: _Entry) -> None:
        from tensorcast_ray import _bootstrap

        if _bootstrap.is_initialized():  # after tc.shutdown the session's holds are gone
            _release(self._store, entry.hold_id)

    def _renew_loop(self) -> None:
        """[background] Take a fresh hold on every held version well before its ttl ends."""
        from tensorcast_ray import _bootstrap

        period = self._sub.hold_ttl_s / 3
        while not self._stop.wait(period):
            if not _bootstrap.is_initialized():  # tc.shutdown() ended the session's holds
                return
            with self._lock:
                entries = [e for e in self._entries.values() if not e.released]
            for entry in entries:
                try:
                    fresh = _hold(self._store, entry.weights.key, self._sub.hold_ttl_s)
                except ArtifactError as exc:  # deleted anyway: the mapping keeps serving
                    logger.info(
                        "%s: hold on %s not renewed: %s", self.name, entry.weights.key, exc.message
                    )
                    continue
                with self._lock:
                    gone = entry.released  # its releaser took (or takes) the old hold id
                    stale = entry.hold_id
                    if not gone:
                        entry.hold_id = fresh.hold_id
                _release(self._store, fresh.hold_id if gone else stale)

    # ---- lifecycle -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise FailedPreconditionError(f"SharedWeights({self.name!r}) is closed")

    def info(self) -> dict[str, Any]:
        """What this replica serves: ``key``, ``load_s``, ``swaps``, ``held`` (versions held
        now) and ``last_error`` (the last background load that failed, or None)."""
        with self._lock:
            return {
                "key": self._current.weights.key,
                "load_s": self._current.weights.load_s,
                "swaps": self.swaps,
                "held": sorted(self._entries),
                "last_error": self.last_error,
            }

    def close(self) -> None:
        """Stop following and release every hold (a replica's ``__del__`` may call it; a
        replica that just exits releases them with its session)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            entries = [e for e in self._entries.values() if not e.released]
            if self._current not in entries and not self._current.released:
                entries.append(self._current)
            for e in entries:
                e.released = True
            self._entries.clear()
        self._stop.set()
        if self._handle is not None:
            self._handle.close(timeout=5.0)
        for e in entries:
            self._release_hold(e)

    def __enter__(self) -> SharedWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _predecessor(key: str) -> str:
    """The integer version just below ``key`` (``name:0`` has none: ``""``), so a wait for a
    version newer than it returns ``key`` or later."""
    name, version = parse_key(key)
    number = int(version)
    return f"{name}:{number - 1}" if number > 0 else ""
