"""Export: stream tensors into safetensors shards, then commit the manifest.  [daemon, SDK]

Runs in the daemon's persistence tasks (and in the SDK for a direct export).  One export:

1. Validate the sources and plan shards with the one planner,
   :func:`tensorcast_ray._policy.plan_shards` (``layout`` ``auto`` / ``unsharded`` /
   ``sharded``: one file up to 128 MiB, else shards of 64-256 MiB, tensors whole and in
   order), unless the caller passes an explicit ``plan``.
2. If the directory already has a valid manifest: same tensors and bytes → verify the shard
   files against their checksums and return it (idempotent re-export), or rewrite them if
   one is damaged; different → :class:`AlreadyExistsError` (versions are immutable).  With
   no valid manifest, leftovers of a crashed export are removed.  A manifest that cannot be
   read for another reason (permissions, storage down) fails the export: it is never taken
   for a missing one.
3. Write the shards, ``parallelism`` at a time, each streamed from the source memoryviews
   in chunks of at most ``max_buffer_bytes`` (never a whole shard in memory) and published
   atomically (see :class:`atomic_writer`), checksumming as the bytes go.  A shard that
   fails with a transient storage error is rewritten from its start (up to
   ``shard_attempts`` attempts, exponential backoff with jitter); the other shards keep
   their results.  A shard that fails for good stops the others at their next chunk.
4. Write ``manifest.json`` last, atomically (retried the same way).  Until then readers see
   NOT_FOUND.

Concurrent exports of one key must carry the same bytes (the Global Store runs one
persistence task per key); the idempotency check makes retries safe.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import grpc
import tenacity

from tensorcast_ray._disk._checksum import Checksum, checksum_for, default_checksum, to_hex
from tensorcast_ray._disk._manifest import FORMAT_VERSION, Manifest, ManifestShard, ManifestTensor
from tensorcast_ray._disk._paths import (
    MANIFEST_NAME,
    artifact_dirname,
    artifact_path,
    atomic_writer,
    filesystem,
    join,
    map_os_error,
)
from tensorcast_ray._disk._reader import load_manifest
from tensorcast_ray._disk._safetensors import build_header, stored_dtype
from tensorcast_ray._disk._streams import Progress, check_deadline, check_tuning
from tensorcast_ray._dtypes import itemsize
from tensorcast_ray._errors import (
    AbortedError,
    AlreadyExistsError,
    ArtifactError,
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
)
from tensorcast_ray._policy import LAYOUTS, plan_shards

__all__ = ["SHARD_STATES", "ShardEvent", "TensorSource", "delete_artifact", "write_artifact"]

T = TypeVar("T")

_MIN_UPLOAD_BLOCK = 5 << 20  # S3's smallest multipart part
#: Bytes checksummed and then written at a time.  Checksum first: when the source is a fresh
#: mapping of shared memory (the daemon's persistence task), the checksum's reads fault its
#: pages in from user space, where the kernel maps 16 pages a fault, instead of one page at a
#: time inside ``write``: 1 GiB from a tmpfs mapping took 0.98-1.05 s (0.9 s system time)
#: written first, 0.68-0.85 s (0.35 s) checksummed first, as from private memory.  Small
#: enough that the write then reads the bytes from cache (1 GiB in 2 MiB bits: crc32c takes
#: 0.046 s against 0.07 s in 64 MiB ones), large enough that syscalls cost nothing.
CRC_PIECE = 2 << 20

#: The states a :class:`ShardEvent` reports, in the order a shard goes through them.
SHARD_STATES = ("pending", "running", "retrying", "success", "failed")

#: Codes a shard (or the manifest) is rewritten on, besides any error flagged retryable:
#: the storage is down or slow, full or throttled, or the attempt was aborted.
_RETRIED_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


@dataclass(frozen=True)
class TensorSource:
    """A tensor to export: canonical dtype, shape and its contiguous bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview  # contiguous bytes, exactly prod(shape) * itemsize(dtype) long


@dataclass(frozen=True)
class ShardEvent:
    """One step of one shard of an export, passed to ``write_artifact``'s ``on_shard``
    (from the writer threads).

    ``index``: the shard's position in the plan; ``file``: the shard file's full URL or path
    (in the root's own form); ``state``: one of :data:`SHARD_STATES`; ``done_bytes`` /
    ``total_bytes``: tensor bytes of this shard written by the current attempt / in all
    (headers not counted); ``attempt``: 1-based (0 while ``pending``, and for a shard that
    never started); ``error``: the error of a ``retrying`` or ``failed`` event, else None.
    """

    index: int
    file: str
    state: str
    done_bytes: int
    total_bytes: int
    attempt: int
    error: BaseException | None = None


class _Stop(Exception):
    """Internal: the export was cancelled, or another shard failed for good."""


class _Control:
    """What every worker checks before each chunk and while backing off."""

    def __init__(self, key: str, cancel: threading.Event | None, deadline: float | None) -> None:
        self.key = key
        self.cancel = cancel
        self.deadline = deadline
        self.halt = threading.Event()  # a shard failed for good: the others stop
        self.failed_shard: int | None = None

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def check(self, doing: str) -> None:
        if self.cancelled() or self.halt.is_set():
            raise _Stop(doing)
        check_deadline(self.deadline, doing)

    def stop_error(self) -> AbortedError:
        """The error a shard stopped by :meth:`check` reports in its ``failed`` event."""
        if self.cancelled():
            return AbortedError(f"export of {self.key} was cancelled")
        return AbortedError(
            f"export of {self.key}: stopped because shard {self.failed_shard} failed"
        )

    def sleep(self, seconds: float) -> None:
        """Back off for ``seconds``, waking early (and stopping) on cancel or halt."""
        end = time.monotonic() + seconds
        while True:
            self.check("backing off before a retry")
            left = end - time.monotonic()
            if left <= 0:
                return
            (self.cancel or self.halt).wait(min(left, 0.05))


def _retryable(err: BaseException | None) -> bool:
    return isinstance(err, ArtifactError) and (err.retryable or err.status_code in _RETRIED_CODES)


def _backoff(attempt: int, wait_s: tuple[float, float], rng: random.Random) -> float:
    """Seconds to wait after attempt ``attempt`` failed: ``lo * 2 ** (attempt - 1)`` capped
    at ``hi``, times a random factor in [1, 2), capped at ``hi`` again."""
    lo, hi = wait_s
    nominal = min(hi, lo * 2 ** (attempt - 1))
    return min(hi, nominal * (1.0 + rng.random()))


def _with_retry(
    fn: Callable[[], T],
    *,
    doing: str,
    attempts: int,
    wait_s: tuple[float, float],
    ctl: _Control,
    rng: random.Random,
    on_retry: Callable[[int, ArtifactError], None] | None = None,
) -> T:
    """``fn()`` until it succeeds, fails with an error that is not transient, or the
    attempts or the deadline run out.  Storage errors are mapped (``map_os_error``)."""

    def attempt() -> T:
        try:
            return fn()
        except (ArtifactError, _Stop):
            raise
        except Exception as exc:
            raise map_os_error(exc, doing) from exc

    def retry(state: tenacity.RetryCallState) -> bool:
        outcome = state.outcome
        return outcome is not None and outcome.failed and _retryable(outcome.exception())

    def stop(state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= attempts or ctl.cancelled() or ctl.halt.is_set():
            return True
        return ctl.deadline is not None and time.monotonic() + state.upcoming_sleep > ctl.deadline

    def before_sleep(state: tenacity.RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome is not None else None
        if on_retry is not None and isinstance(err, ArtifactError):
            on_retry(state.attempt_number, err)

    retrying = tenacity.Retrying(
        stop=stop,
        wait=lambda state: _backoff(state.attempt_number, wait_s, rng),
        retry=retry,
        before_sleep=before_sleep,
        sleep=ctl.sleep,
    )
    try:
        return retrying(attempt)
    except tenacity.RetryError as gave_up:
        last = gave_up.last_attempt.exception()
        assert isinstance(last, ArtifactError)  # retry() accepts ArtifactErrors only
        if ctl.cancelled() or ctl.halt.is_set():
            raise _Stop(doing) from last
        n = gave_up.last_attempt.attempt_number
        if n < attempts:  # the deadline ended it
            raise DeadlineExceededError(
                f"{doing}: the export's deadline passed after {n} attempt"
                f"{'s' if n != 1 else ''}; last error: {last}"
            ) from last
        if attempts == 1:
            raise last from last.__cause__
        raise type(last)(
            f"{doing}: gave up after {n} attempts: {last.message}",
            last.status_code,
            last.retryable,
        ) from last


def _bytes_of(src: TensorSource) -> memoryview:
    if not isinstance(src, TensorSource):
        raise InvalidArgumentError(f"expected a TensorSource, got {type(src).__name__}")
    if not isinstance(src.name, str) or not src.name or src.name == "__metadata__":
        raise InvalidArgumentError(f"tensor name must be a non-empty string, got {src.name!r}")
    size = itemsize(src.dtype)
    if not isinstance(src.shape, tuple) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in src.shape
    ):
        raise InvalidArgumentError(
            f"tensor {src.name!r}: shape must be a tuple of non-negative ints, got {src.shape!r}"
        )
    try:
        view = memoryview(src.data)
        if not view.c_contiguous:
            raise ValueError("not C-contiguous")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"tensor {src.name!r}: data must be a contiguous buffer ({exc}); "
            "call .contiguous() first"
        ) from None
    want = math.prod(src.shape) * size
    if view.nbytes != want:
        raise InvalidArgumentError(
            f"tensor {src.name!r}: data has {view.nbytes} bytes but {src.dtype}{list(src.shape)} "
            f"needs {want}"
        )
    return view


def _write_all(f: Any, view: memoryview) -> None:
    while view.nbytes:
        n = f.write(view)
        view = view[view.nbytes if n is None else n :]


def _write_shard(
    fs: fsspec.AbstractFileSystem,
    path: str,
    header: bytes,
    views: Sequence[memoryview],
    algo: Checksum,
    chunk: int,
    check: Callable[[], None],
    on_chunk: Callable[[int], None],
) -> tuple[int, list[int]]:
    """Stream one shard; returns (its checksum, each tensor's checksum).  ``check()`` runs
    before every chunk (it raises to stop: the partial file is then discarded),
    ``on_chunk(n)`` after each chunk of ``n`` tensor bytes."""
    crcs = []
    check()
    with atomic_writer(fs, path, max(chunk, _MIN_UPLOAD_BLOCK)) as f:
        _write_all(f, memoryview(header))
        shard_crc = algo.of(header)
        for view in views:
            crc = 0
            for pos in range(0, view.nbytes, chunk):
                check()
                piece = view[pos : pos + chunk]
                for sub in range(0, piece.nbytes, CRC_PIECE):
                    bit = piece[sub : sub + CRC_PIECE]
                    crc = algo.update(crc, bit)  # first: see CRC_PIECE
                    _write_all(f, bit)
                on_chunk(piece.nbytes)
            crcs.append(crc)
            shard_crc = algo.combine(shard_crc, crc, view.nbytes)
        check()
    return shard_crc, crcs


def _existing(fs: fsspec.AbstractFileSystem, directory: str, where: str) -> Manifest | None:
    try:
        return load_manifest(fs, directory, where)
    except NotFoundError:
        return None
    except DataLossError:
        return None  # corrupt: nothing was committed that readers trust; write it again
    # Anything else (PERMISSION_DENIED, UNAVAILABLE, ...) propagates: the directory may hold
    # a committed version we could not read, and it must not be removed or overwritten.


def _matches(
    old: Manifest,
    key: str,
    artifact_id: str,
    tensors: Sequence[TensorSource],
    views: Sequence[memoryview],
) -> bool:
    if old.key != key or (artifact_id and old.artifact_id and old.artifact_id != artifact_id):
        return False
    if [(t.name, t.dtype, t.shape) for t in old.tensors] != [
        (s.name, s.dtype, s.shape) for s in tensors
    ]:
        return False
    algo = checksum_for(old.checksum_algorithm)
    return all(algo.of(v) == int(t.checksum, 16) for t, v in zip(old.tensors, views, strict=True))


def _shards_intact(
    fs: fsspec.AbstractFileSystem, directory: str, m: Manifest, chunk_bytes: int
) -> bool:
    """Every shard file has its recorded size and whole-file checksum (streamed in chunks of
    ``chunk_bytes``: a re-export reads what it would otherwise write, never all at once)."""
    algo = checksum_for(m.checksum_algorithm)
    try:
        for shard in m.shards:
            path = join(directory, shard.file)
            if fs.size(path) != shard.size:
                return False
            crc = 0
            with fs.open(path, "rb") as f:
                while chunk := f.read(chunk_bytes):
                    crc = algo.update(crc, chunk)
            if to_hex(crc) != shard.checksum:
                return False
    except FileNotFoundError:
        return False
    return True


def _check_plan(plan: object, n: int) -> list[list[int]]:
    """An explicit plan: lists of tensor indices, every index once and in order, no empty
    shard (but the single empty one of an artifact without tensors)."""
    if n == 0 and isinstance(plan, (list, tuple)) and list(plan) in ([], [[]], [()]):
        return [[]]
    rule = (
        "plan must be a list of non-empty lists of tensor indices that lists every index "
        f"0..{n - 1} once, in order"
    )
    if not isinstance(plan, (list, tuple)) or not plan:
        raise InvalidArgumentError(f"{rule}, got {plan!r}")
    shards: list[list[int]] = []
    for shard in plan:
        if not isinstance(shard, (list, tuple)) or not shard:
            raise InvalidArgumentError(f"{rule}; got a shard {shard!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in shard):
            raise InvalidArgumentError(f"{rule}; got a shard {shard!r}")
        shards.append(list(shard))
    flat = [i for shard in shards for i in shard]
    if flat != list(range(n)):
        raise InvalidArgumentError(f"{rule}; got {plan!r}")
    return shards


def _check_retry_args(
    shard_attempts: object, retry_wait_s: object, deadline: object
) -> tuple[float, float]:
    if (
        isinstance(shard_attempts, bool)
        or not isinstance(shard_attempts, int)
        or shard_attempts < 1
    ):
        raise InvalidArgumentError(f"shard_attempts must be an int >= 1, got {shard_attempts!r}")
    pair = tuple(retry_wait_s) if isinstance(retry_wait_s, (tuple, list)) else ()
    ok = (
        len(pair) == 2
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in pair
        )
        and 0 <= pair[0] <= pair[1]
    )
    if not ok:
        raise InvalidArgumentError(
            f"retry_wait_s must be (min, max) seconds with 0 <= min <= max, got {retry_wait_s!r}"
        )
    if deadline is not None and (
        isinstance(deadline, bool)
        or not isinstance(deadline, (int, float))
        or not math.isfinite(deadline)
    ):
        raise InvalidArgumentError(
            f"deadline must be a time.monotonic() value or None, got {deadline!r}"
        )
    return float(pair[0]), float(pair[1])


def write_artifact(
    root: str,
    key: str,
    tensors: Sequence[TensorSource],
    *,
    artifact_id: str = "",
    storage_options: Mapping[str, Any] | None = None,
    layout: str = "auto",
    plan: Sequence[Sequence[int]] | None = None,
    max_buffer_bytes: int = 64 << 20,
    parallelism: int = 4,
    progress: Callable[[int, int], None] | None = None,
    on_shard: Callable[[ShardEvent], None] | None = None,
    cancel: threading.Event | None = None,
    shard_attempts: int = 1,
    retry_wait_s: tuple[float, float] = (0.2, 5.0),
    deadline: float | None = None,
) -> Manifest:
    """Export ``tensors`` as artifact ``key`` under ``root``; returns the committed manifest.

    ``layout`` (``auto`` / ``unsharded`` / ``sharded``) picks the shards through
    :func:`tensorcast_ray._policy.plan_shards`; ``plan`` (lists of tensor indices, every
    index once and in order) overrides it.  ``progress(done, total)`` reports tensor bytes
    of the whole export (monotone: a retried shard counts only bytes beyond what it reached
    before).  ``on_shard(ShardEvent)`` reports each shard: ``pending`` (all of them, after
    planning, before any write), ``running`` at each attempt's start and after each chunk,
    ``retrying`` (with the error) before a retry, then ``success`` or ``failed``; shards
    stopped because the export was cancelled or another shard failed end ``failed`` with an
    ``AbortedError``.  An idempotent re-export reports the existing shards ``pending`` then
    ``success``.  Both callbacks run in the writer threads (several at once with
    ``parallelism`` > 1): keep them quick and thread-safe; an exception they raise fails the
    export.

    ``cancel`` is checked before each chunk and while backing off: once set, the writes
    stop, partial and published shard files of this export are removed, no manifest is
    written and ``AbortedError("export of <key> was cancelled")`` is raised.  A shard (or the
    manifest) failing with a transient storage error (UNAVAILABLE, DEADLINE_EXCEEDED,
    RESOURCE_EXHAUSTED, ABORTED, or any error flagged retryable) is rewritten from its start,
    up to ``shard_attempts`` attempts in all, waiting between ``retry_wait_s[0]`` and
    ``retry_wait_s[1]`` seconds (exponential, with jitter); any other error fails it at once,
    and a shard that fails for good stops the others at their next chunk and its error is
    raised.  ``deadline`` (a ``time.monotonic()`` value) bounds the whole export, backoff
    included: past it, DEADLINE_EXCEEDED.
    """
    check_tuning(max_buffer_bytes, parallelism)
    if layout not in LAYOUTS:
        raise InvalidArgumentError(
            f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}"
        )
    wait_s = _check_retry_args(shard_attempts, retry_wait_s, deadline)
    for name, fn in (("progress", progress), ("on_shard", on_shard)):
        if fn is not None and not callable(fn):
            raise InvalidArgumentError(f"{name} must be callable or None, got {fn!r}")
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise InvalidArgumentError(f"cancel must be a threading.Event or None, got {cancel!r}")
    views = [_bytes_of(t) for t in tensors]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InvalidArgumentError(f"tensor names must be unique; repeated: {dup}")
    sizes = [v.nbytes for v in views]
    shards_plan = (
        plan_shards(sum(sizes), sizes, layout) if plan is None else _check_plan(plan, len(views))
    )
    fs, root_path = filesystem(root, storage_options)
    directory = join(root_path, artifact_dirname(key))
    url = artifact_path(root, key)
    where = f"artifact {key!r} at {url}"
    ctl = _Control(key, cancel, deadline)
    rng = random.Random()

    def emit(event: ShardEvent) -> None:
        if on_shard is not None:
            on_shard(event)

    def retried(fn: Callable[[], T], doing: str) -> T:
        return _with_retry(
            fn, doing=doing, attempts=shard_attempts, wait_s=wait_s, ctl=ctl, rng=rng
        )

    def prepare() -> Manifest | None:
        ctl.check(f"preparing {where}")
        old = _existing(fs, directory, where)
        if old is not None:
            if not _matches(old, key, artifact_id, tensors, views):
                raise AlreadyExistsError(
                    f"{where} is already committed with different tensors; versions are "
                    "immutable: export under a new version key, or delete_artifact() it first"
                )
            try:
                if _shards_intact(fs, directory, old, max_buffer_bytes):
                    return old
            except OSError as exc:
                raise map_os_error(exc, f"verifying {where}") from exc
        try:
            fs.invalidate_cache(directory)
            if old is None and fs.exists(directory):
                fs.rm(directory, recursive=True)  # leftovers of a crashed export
            fs.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise map_os_error(exc, f"preparing {where}") from exc
        return None

    try:
        intact = retried(prepare, f"preparing {where}")
    except _Stop:
        raise ctl.stop_error() from None
    if intact is not None:
        for s, shard in enumerate(intact.shards):
            n = sum(t.nbytes for t in intact.tensors if t.shard == s)
            emit(ShardEvent(s, join(url, shard.file), "pending", 0, n, 0))
            emit(ShardEvent(s, join(url, shard.file), "success", n, n, 1))
        return intact

    algo = default_checksum()
    count = len(shards_plan)
    files = [f"shard-{i:05d}-of-{count:05d}.safetensors" for i in range(count)]
    meta = {"format": "pt", "tensorcast.key": key, "tensorcast.artifact_id": artifact_id}
    headers = [
        build_header(
            [(names[i], tensors[i].dtype, tensors[i].shape, views[i].nbytes) for i in idx], meta
        )
        for idx in shards_plan
    ]
    shard_total = [sum(sizes[i] for i in idx) for idx in shards_plan]
    tracker = Progress(sum(sizes), progress)
    lock = threading.Lock()
    high_water = [0] * count  # bytes each shard reached in any attempt (progress is monotone)
    ended = [False] * count  # a success / failed event was sent
    errors: list[BaseException] = []  # shards that failed for good, in the order they did
    results: list[tuple[int, list[int]] | None] = [None] * count

    for s in range(count):
        emit(ShardEvent(s, join(url, files[s]), "pending", 0, shard_total[s], 0))

    def end(s: int, state: str, done: int, attempt: int, error: BaseException | None) -> None:
        with lock:
            if ended[s]:
                return
            ended[s] = True
        emit(ShardEvent(s, join(url, files[s]), state, done, shard_total[s], attempt, error))

    def run_shard(s: int) -> tuple[int, list[int]]:
        file = join(url, files[s])
        attempt = 0
        done = 0
        doing = f"writing shard {s} ({files[s]}) of {where}"

        def check() -> None:
            ctl.check(doing)

        def on_chunk(n: int) -> None:
            nonlocal done
            done += n
            with lock:
                grown = done - high_water[s]
                if grown > 0:
                    high_water[s] = done
            if grown > 0:
                tracker.add(grown)
            emit(ShardEvent(s, file, "running", done, shard_total[s], attempt))

        def one_attempt() -> tuple[int, list[int]]:
            nonlocal attempt, done
            attempt += 1
            done = 0
            emit(ShardEvent(s, file, "running", 0, shard_total[s], attempt))
            return _write_shard(
                fs,
                join(directory, files[s]),
                headers[s],
                [views[i] for i in shards_plan[s]],
                algo,
                max_buffer_bytes,
                check,
                on_chunk,
            )

        def on_retry(n: int, err: ArtifactError) -> None:
            emit(ShardEvent(s, file, "retrying", done, shard_total[s], n, err))

        try:
            result = _with_retry(
                one_attempt,
                doing=doing,
                attempts=shard_attempts,
                wait_s=wait_s,
                ctl=ctl,
                rng=rng,
                on_retry=on_retry,
            )
        except _Stop:
            end(s, "failed", done, attempt, ctl.stop_error())
            raise
        except BaseException as exc:
            with lock:
                errors.append(exc)
                if ctl.failed_shard is None:
                    ctl.failed_shard = s
            ctl.halt.set()
            end(s, "failed", done, attempt, exc)
            raise
        results[s] = result
        end(s, "success", shard_total[s], attempt, None)
        return result

    workers = min(parallelism, count)
    try:
        if workers <= 1:
            for s in range(count):
                run_shard(s)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="tc-disk-write") as pool:
                futures = [pool.submit(run_shard, s) for s in range(count)]
                wait(futures, return_when=FIRST_EXCEPTION)
                if ctl.halt.is_set() or ctl.cancelled():
                    for fut in futures:
                        fut.cancel()  # not started: never run
                # Running shards stop at their next chunk (they check halt / cancel).
                wait(futures)
            for fut in futures:
                if not fut.cancelled() and fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]
            if any(r is None for r in results):  # cancelled before they started
                raise _Stop(where)
        ctl.check(f"committing {where}")
    except BaseException as exc:
        stop = ctl.stop_error()
        for s in range(count):
            end(s, "failed", high_water[s], 0, stop)  # shards that never ran
        if errors:
            first = errors[0]
            if first is exc:
                raise
            raise first from first.__cause__  # keeps the storage's error as the cause
        if ctl.cancelled():
            _remove_written(fs, directory, [files[s] for s in range(count) if results[s]])
            raise AbortedError(f"export of {key} was cancelled") from None
        if isinstance(exc, _Stop):  # e.g. the deadline passed while stopping
            raise stop from None
        raise

    shards, entries = [], []
    for s, idx in enumerate(shards_plan):
        result = results[s]
        assert result is not None
        shard_crc, crcs = result
        offset = len(headers[s])
        size = offset + shard_total[s]
        shards.append(
            ManifestShard(files[s], size, to_hex(shard_crc), offset, to_hex(algo.of(headers[s])))
        )
        for i, crc in zip(idx, crcs, strict=True):
            t = tensors[i]
            entries.append(
                ManifestTensor(
                    t.name,
                    t.dtype,
                    tuple(t.shape),
                    s,
                    offset,
                    views[i].nbytes,
                    to_hex(crc),
                    stored_dtype(t.dtype, t.shape)[0],
                )
            )
            offset += views[i].nbytes
    manifest = Manifest(
        FORMAT_VERSION, artifact_id, key, time.time(), algo.name, tuple(shards), tuple(entries)
    )
    body = manifest.to_json()
    manifest_doing = f"committing the manifest of {where}"
    _check_published(fs, directory, shards, where)

    def commit() -> None:
        ctl.check(manifest_doing)
        with atomic_writer(fs, join(directory, MANIFEST_NAME), _MIN_UPLOAD_BLOCK) as f:
            f.write(body)

    try:
        retried(commit, manifest_doing)
    except _Stop:
        if ctl.cancelled():
            _remove_written(fs, directory, files)
            raise AbortedError(f"export of {key} was cancelled") from None
        raise ctl.stop_error() from None
    return manifest


def _check_published(
    fs: fsspec.AbstractFileSystem, directory: str, shards: Sequence[ManifestShard], where: str
) -> None:
    """Before the manifest commits: every shard file is there, at its size. A file removed
    meanwhile (a delete of the key racing this export) would otherwise leave a committed
    manifest over missing bytes; the export fails ABORTED instead (not retried: the caller
    decides), and nothing is committed."""
    try:
        fs.invalidate_cache(directory)
        for shard in shards:
            path = join(directory, shard.file)
            try:
                size = fs.size(path)
            except FileNotFoundError:
                size = None
            if size != shard.size:
                raise AbortedError(
                    f"{where}: shard {shard.file} is {'gone' if size is None else 'altered'} "
                    "before the manifest was committed (the key was deleted or written "
                    "meanwhile); nothing was committed",
                    retryable=False,
                )
    except ArtifactError:
        raise
    except Exception as exc:
        raise map_os_error(exc, f"checking the shards of {where}") from exc


def _remove_written(fs: fsspec.AbstractFileSystem, directory: str, files: Sequence[str]) -> None:
    """Best effort, after a cancel: the shard files this export published, then the
    directory if nothing else is left in it."""
    for name in files:
        with contextlib.suppress(Exception):
            fs.rm_file(join(directory, name))
    with contextlib.suppress(Exception):
        fs.invalidate_cache(directory)
        if not fs.ls(directory, detail=False):
            fs.rm(directory, recursive=True)


def delete_artifact(
    root: str, key: str, *, storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Remove ``key``'s directory (manifest first, so readers stop at once); False if absent."""
    fs, root_path = filesystem(root, storage_options)
    directory = join(root_path, artifact_dirname(key))
    try:
        fs.invalidate_cache(directory)
        if not fs.exists(directory):
            return False
        manifest = join(directory, MANIFEST_NAME)
        if fs.exists(manifest):
            fs.rm_file(manifest)
        fs.rm(directory, recursive=True)
    except FileNotFoundError:
        return True  # removed concurrently
    except Exception as exc:  # OS errors, and object stores' connection failures
        raise map_os_error(exc, f"deleting artifact {key!r} under {root}") from exc
    return True
