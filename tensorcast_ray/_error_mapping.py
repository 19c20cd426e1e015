"""The one boundary where lower-layer errors become ArtifactErrors.  [SDK, daemon, Global Store]

Everything a caller sees is an :class:`~tensorcast_ray._errors.ArtifactError`.  The layers
underneath fail in their own vocabularies -- gRPC status codes, ``ray.exceptions``, ``OSError``
-- and this module translates each of them once, to the most specific subclass, with a message
that says what to do next.  The original exception is always kept as ``__cause__``.

How one of our errors crosses the daemon's gRPC boundary::

    [daemon]  servicer catches NotFoundError("no key 'llama'")
              await abort_with(context, err)
                -> context.abort(NOT_FOUND, "no key 'llama'",
                                 trailing_metadata=(("tc-error-class", "NotFoundError"),
                                                    ("tc-retryable", "0")))
    [SDK]     the stub raises grpc.RpcError
              from_grpc_error(rpc_error, target="127.0.0.1:50123")
                -> NotFoundError("no key 'llama'") with the same code and retryable flag

The daemon's local unix socket carries the same four fields (:func:`wire_fields`, decoded by
:func:`from_wire`), so a failure reads the same over either channel; both servers turn what a
handler raised into an ArtifactError with :func:`handler_error`.  OS errors, wherever they
come from (a handler, shared memory, checkpoint storage), are mapped by :func:`map_os_error`.

Across a Ray actor boundary our errors travel by pickling (see ``ArtifactError.__reduce__``);
the driver receives a ``RayTaskError`` whose ``.cause`` is the original, which
:func:`map_exception` unwraps.

``ray`` is imported lazily and only if the process has already imported it, so this module
imports (and maps gRPC / OS errors) in a process without Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

import grpc
import grpc.aio

from tensorcast_ray import _errors
from tensorcast_ray._errors import (
    AbortedError,
    ArtifactError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnavailableError,
    error_for_code,
)

__all__ = [
    "ERROR_CLASS_METADATA_KEY",
    "RETRYABLE_METADATA_KEY",
    "abort_with",
    "daemon_deadline_error",
    "daemon_unreachable_error",
    "from_grpc_error",
    "from_wire",
    "grpc_abort_args",
    "handler_error",
    "map_exception",
    "map_os_error",
    "reraise_mapped",
    "wire_fields",
]

logger = logging.getLogger(__name__)

ERROR_CLASS_METADATA_KEY = "tc-error-class"
RETRYABLE_METADATA_KEY = "tc-retryable"

_DAEMON_HINT = "check `tensorcast-ray daemon status`"

# Only names from our own error tree may be revived from metadata: a peer must never be able
# to make us instantiate an arbitrary class.
_CLASSES_BY_NAME: dict[str, type[ArtifactError]] = {
    name: obj
    for name in _errors.__all__
    if isinstance(obj := getattr(_errors, name), type) and issubclass(obj, ArtifactError)
}

# error_for_code sends these three to InternalError ("a bug"); none of them is a bug, so the
# mapping picks the closest family while keeping the original code.
_REFINED_CLASS: dict[grpc.StatusCode, type[ArtifactError]] = {
    grpc.StatusCode.CANCELLED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDeniedError,
}


def _make(
    code: grpc.StatusCode,
    message: str,
    retryable: bool | None = None,
    cls: type[ArtifactError] | None = None,
) -> ArtifactError:
    if cls is not None:
        return cls(message, code, retryable)
    refined = _REFINED_CLASS.get(code)
    if refined is not None:
        return refined(message, code, retryable)
    return error_for_code(code, message, retryable)


def _prefix(context: str, message: str) -> str:
    return f"{context}: {message}" if context else message


# ---------------------------------------------------------------------------------------------
# The wire codec: the same four fields over gRPC and the local socket
# ---------------------------------------------------------------------------------------------


def wire_fields(err: ArtifactError) -> tuple[grpc.StatusCode, str, str, bool]:
    """``(code, message, class name, retryable)``: what either channel carries.  [daemon, GS]

    An ``OK`` code (never an error) is sent as ``INTERNAL``; a subclass defined elsewhere
    is sent as the nearest class of our tree, the only names a client revives.
    """
    code = err.status_code
    if code is grpc.StatusCode.OK:
        code = grpc.StatusCode.INTERNAL
    cls_name = type(err).__name__
    if _CLASSES_BY_NAME.get(cls_name) is not type(err):
        cls_name = next(
            c.__name__ for c in type(err).__mro__ if _CLASSES_BY_NAME.get(c.__name__) is c
        )
    return code, err.message, cls_name, err.retryable


def from_wire(
    code: grpc.StatusCode, message: str, cls_name: str, retryable: bool | None
) -> ArtifactError:
    """The error :func:`wire_fields` described: same class, code, message and flag.  [SDK]

    A class name outside our tree (or none) falls back to the class for the code.
    """
    cls = _CLASSES_BY_NAME.get(cls_name)
    if cls is not None:
        return cls(message, code, retryable)
    return _make(code, message, retryable)


def handler_error(exc: BaseException, method: str) -> ArtifactError:
    """What a daemon or Global Store handler raised, as the error its caller gets.  [daemon, GS]

    Both channels call this, so one failure is one error whichever way it travels; anything
    that is not already an ArtifactError is logged with its traceback.
    """
    if isinstance(exc, ArtifactError):
        return exc
    logger.error("%s failed", method, exc_info=exc)
    return map_exception(exc, context=method)


def daemon_unreachable_error(target: str, details: str) -> UnavailableError:
    """[SDK] The connection to the daemon at ``target`` failed or closed (either channel)."""
    where = f" at {target}" if target else ""
    return UnavailableError(
        f"the tensorcast daemon{where} is not reachable ({details or 'no details'}); "
        f"it may be restarting -- retry, or {_DAEMON_HINT}"
    )


def daemon_deadline_error(target: str, details: str) -> DeadlineExceededError:
    """[SDK] A call to the daemon at ``target`` got no reply in time (either channel)."""
    where = f" at {target}" if target else ""
    return DeadlineExceededError(
        f"the call to the tensorcast daemon{where} ran past its deadline "
        f"({details or 'no details'}); the daemon may be overloaded -- retry with a "
        f"longer deadline, or {_DAEMON_HINT}"
    )


# ---------------------------------------------------------------------------------------------
# gRPC
# ---------------------------------------------------------------------------------------------


def grpc_abort_args(
    err: ArtifactError,
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """``(code, details, trailing_metadata)`` for aborting an RPC with ``err``.  [daemon, GS]

    The metadata names the error class and the retryable flag (:func:`wire_fields`) so the
    client rebuilds the same error.
    """
    code, message, cls_name, retryable = wire_fields(err)
    metadata = (
        (ERROR_CLASS_METADATA_KEY, cls_name),
        (RETRYABLE_METADATA_KEY, "1" if retryable else "0"),
    )
    return code, message, metadata


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], err: ArtifactError) -> NoReturn:
    """Abort the current RPC with ``err`` (class and flag travel as trailing metadata).  [daemon]"""
    code, details, metadata = grpc_abort_args(err)
    await context.abort(code, details, trailing_metadata=metadata)
    raise AssertionError("grpc context.abort returned")  # pragma: no cover - abort raises


def _metadata_pairs(err: grpc.RpcError) -> Iterable[tuple[str, Any]]:
    getter = getattr(err, "trailing_metadata", None)
    if getter is None:
        return ()
    try:
        metadata = getter()
    except Exception:  # a call that never got a response has nothing to read
        return ()
    if not metadata:
        return ()
    pairs: list[tuple[str, Any]] = []
    for item in metadata:
        # sync grpc yields _Metadatum(key, value) tuples, grpc.aio yields plain (key, value).
        key, value = item[0], item[1]
        pairs.append((str(key), value))
    return pairs


def _grpc_message(code: grpc.StatusCode, details: str, target: str) -> str:
    where = f" at {target}" if target else ""
    if code is grpc.StatusCode.UNAVAILABLE:
        return daemon_unreachable_error(target, details).message
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return daemon_deadline_error(target, details).message
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return (
            f"the tensorcast daemon{where} does not implement this call ({details}); "
            "the SDK and the daemon may run different tensorcast_ray versions"
        )
    if code is grpc.StatusCode.OK:
        return (
            f"a gRPC call{where} was reported as failed with status OK ({details}); this is a bug"
        )
    return f"{details or code.name}{f' (from {target})' if target else ''}"


def from_grpc_error(err: grpc.RpcError, *, target: str = "") -> ArtifactError:
    """The ArtifactError an RPC failed with.  [SDK]

    If the server sent it with :func:`abort_with`, the same class, code, message and
    retryable flag come back; otherwise the code decides, with a message naming ``target``
    (the server's address).  ``__cause__`` is set to ``err``.
    """
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    details = (details_fn() if callable(details_fn) else None) or ""

    metadata = dict(_metadata_pairs(err))
    cls_name = str(metadata.get(ERROR_CLASS_METADATA_KEY, ""))
    flag = metadata.get(RETRYABLE_METADATA_KEY)
    retryable = None if flag is None else str(flag) in ("1", "true", "True")

    mapped: ArtifactError
    if code is grpc.StatusCode.OK:
        mapped = InternalError(_grpc_message(code, details, target), grpc.StatusCode.INTERNAL)
    elif cls_name in _CLASSES_BY_NAME:
        mapped = from_wire(code, details, cls_name, retryable)
    else:
        mapped = _make(code, _grpc_message(code, details, target), retryable)
    mapped.__cause__ = err
    return mapped


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------

_C = grpc.StatusCode
_U, _D, _A = _C.UNAVAILABLE, _C.DEADLINE_EXCEEDED, _C.ABORTED
_R, _F, _I = _C.RESOURCE_EXHAUSTED, _C.FAILED_PRECONDITION, _C.INTERNAL

_ACTOR_DOWN = (
    "a tensorcast actor (daemon or Global Store) died or is restarting; it is restarted "
    f"automatically -- retry, or {_DAEMON_HINT}"
)
_NODE_DOWN = "a Ray worker or node died; retry reaches a restarted daemon or another replica"
_OVERLOADED = "the actor has too many calls pending (overloaded); retry with backoff"
_BYTES_LOST = "bytes in transit through Ray were lost; retry asks the serving daemon again"
_FREED = "the bytes were freed (evicted or replaced) mid-transfer; retry re-resolves them"
_SLOW = "a Ray call timed out; retry, or give it a longer deadline"
_TRANSPORT = "a Ray transport failed; retry"
_FULL = "Ray ran out of object store, memory or disk; free some or add capacity"
_UNSCHEDULABLE = "Ray cannot schedule the actor or task (node gone, resources, placement group)"
_RUNTIME_ENV = "Ray could not set up the runtime environment; fix runtime_env"
_RAY_BUG = "Ray failed internally; please report it with the traceback"

#: Ray exception class name -> (code, retryable, advice).  Looked up along the MRO, so a class
#: Ray adds later still maps through its parent; the unit tests keep this table complete.
_RAY_TABLE: dict[str, tuple[grpc.StatusCode, bool, str]] = {
    "RayActorError": (_U, True, _ACTOR_DOWN),
    "ActorDiedError": (_U, True, _ACTOR_DOWN),
    "ActorUnavailableError": (_U, True, _ACTOR_DOWN),
    "AsyncioActorExit": (_U, True, _ACTOR_DOWN),
    "WorkerCrashedError": (_U, True, _NODE_DOWN),
    "NodeDiedError": (_U, True, _NODE_DOWN),
    "LocalRayletDiedError": (_U, False, "this node's raylet died; restart this process"),
    "PendingCallsLimitExceeded": (_U, True, _OVERLOADED),
    "PlasmaObjectNotAvailable": (_U, True, _BYTES_LOST),
    "ObjectLostError": (_U, True, _BYTES_LOST),
    "OwnerDiedError": (_U, True, _BYTES_LOST),
    "ObjectReconstructionFailedError": (_U, True, _BYTES_LOST),
    "ObjectFreedError": (_A, True, _FREED),
    "ObjectFetchTimedOutError": (_D, True, _SLOW),
    "GetTimeoutError": (_D, True, _SLOW),
    "RayChannelTimeoutError": (_D, True, _SLOW),
    "RayChannelError": (_U, True, _TRANSPORT),
    "RayDirectTransportError": (_U, True, _TRANSPORT),
    "RpcError": (_U, True, _TRANSPORT),
    "ObjectStoreFullError": (_R, False, _FULL),
    "OutOfDiskError": (_R, False, _FULL),
    "OutOfMemoryError": (_R, False, _FULL),
    "RayCgraphCapacityExceeded": (_R, False, _FULL),
    "ActorUnschedulableError": (_F, False, _UNSCHEDULABLE),
    "TaskUnschedulableError": (_F, False, _UNSCHEDULABLE),
    "ActorPlacementGroupRemoved": (_F, False, _UNSCHEDULABLE),
    "TaskPlacementGroupRemoved": (_F, False, _UNSCHEDULABLE),
    "RuntimeEnvSetupError": (_F, False, _RUNTIME_ENV),
    "ActorAlreadyExistsError": (_C.ALREADY_EXISTS, False, "a Ray actor of that name exists"),
    "ActorHandleNotFoundError": (_C.NOT_FOUND, False, "the Ray actor handle is not known"),
    "AuthenticationError": (_C.UNAUTHENTICATED, False, "Ray refused the auth token"),
    "TaskCancelledError": (_C.CANCELLED, False, "the Ray task was cancelled"),
    "RayTaskError": (_I, False, "a Ray task failed"),
    "UserCodeException": (_I, False, "user code failed inside Ray"),
    "RaySystemError": (_I, False, _RAY_BUG),
    "StreamingGeneratorReplayInconsistentError": (_I, False, _RAY_BUG),
    "ObjectRefStreamEndOfStreamError": (_I, False, _RAY_BUG),
    "ReferenceCountingAssertionError": (_I, False, _RAY_BUG),
    "CrossLanguageError": (_I, False, "a call into another language failed"),
    "UnserializableException": (_I, False, "a remote exception could not be unpickled"),
    "OufOfBandObjectRefSerializationException": (_I, False, _RAY_BUG),
    "RayError": (_I, False, _RAY_BUG),
}


def _ray_exceptions() -> Any | None:
    # Only look if the process already imported Ray: a Ray error cannot exist otherwise, and
    # importing Ray here would cost seconds in processes that never use it.
    if "ray" not in sys.modules:
        return None
    try:
        import ray.exceptions as ray_exceptions
    except ImportError:  # pragma: no cover - a broken Ray install
        return None
    return ray_exceptions


def _map_ray(exc: BaseException, context: str, rex: Any) -> ArtifactError | None:
    if isinstance(exc, rex.RayTaskError):
        # Checked before the ArtifactError pass-through: Ray's driver-side error is a dual
        # subclass of RayTaskError *and* the cause's class.
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ArtifactError):
            if cause.__cause__ is None:
                cause.__cause__ = exc
            return cause
        if isinstance(cause, BaseException) and cause is not exc:
            mapped = map_exception(cause, context=context)
            mapped.__cause__ = exc
            return mapped
    if not isinstance(exc, rex.RayError):
        return None
    for klass in type(exc).__mro__:
        entry = _RAY_TABLE.get(klass.__name__)
        if entry is None or getattr(rex, klass.__name__, None) is not klass:
            continue
        code, retryable, advice = entry
        if klass.__name__ in ("RayActorError", "ActorDiedError") and getattr(
            exc, "actor_init_failed", False
        ):
            code, retryable = _C.FAILED_PRECONDITION, False
            advice = "the actor failed in its constructor; read its logs (`ray logs`)"
        if klass.__name__ == "RpcError":
            rpc_code = getattr(exc, "rpc_code", None)
            known = {c.value[0]: c for c in grpc.StatusCode}
            if rpc_code in known and known[rpc_code] is not _C.OK:
                code = known[rpc_code]
                retryable = code in _errors.RETRYABLE_CODES
        mapped = _make(code, _prefix(context, f"{advice} ({type(exc).__name__}: {exc})"), retryable)
        mapped.__cause__ = exc
        return mapped
    return None


# ---------------------------------------------------------------------------------------------
# OS and the rest
# ---------------------------------------------------------------------------------------------

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT})
_FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
_PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
_CONNECTION_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENOTCONN,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    }
)
#: OS errors that say a storage request itself is wrong (a path that is a directory, a
#: read-only mount ...): retrying cannot help, so they stay INTERNAL even for storage.
_PERMANENT_ERRNOS = frozenset(
    {errno.EISDIR, errno.ENOTDIR, errno.EINVAL, errno.ENAMETOOLONG, errno.EROFS, errno.ELOOP}
)
_MiB = 1024 * 1024


def _tmpfs_full(shm_dir: str, size: int) -> str:
    try:
        st = os.statvfs(shm_dir)
        free = f"{st.f_bavail * st.f_frsize / _MiB:.0f} MiB"
    except OSError:
        free = "unknown"
    return (
        f"{shm_dir} is full (needed {size / _MiB:.1f} MiB, free: {free}). Delete artifacts "
        "you no longer need, lower the daemon's pool reserve, or grow the tmpfs: "
        f"`sudo mount -o remount,size=<N>G {shm_dir}`; in Docker `--shm-size=<N>g`; on "
        f"Kubernetes mount an emptyDir with medium: Memory and sizeLimit at {shm_dir}"
    )


def map_os_error(
    exc: OSError,
    context: str = "",
    *,
    shm_dir: str | None = None,
    size: int = 0,
    storage: bool = False,
) -> ArtifactError:
    """The one OS-error mapping: ``exc`` as the most specific ArtifactError.

    ``context`` says what was being done (it prefixes the message).  ``shm_dir`` marks an
    operation on a shared-memory segment there (of ``size`` bytes): a full tmpfs then says
    how to grow it, a missing directory is a setup error.  ``storage`` marks checkpoint
    storage (fsspec): its remote backends report failed or throttled requests as OS errors
    with no or odd errnos (EIO, EBUSY for S3 SlowDown, EREMOTEIO), which are retryable
    UNAVAILABLE there.  ``__cause__`` is left to the caller (``raise ... from exc``).
    """
    what = f"{type(exc).__name__}: {exc}"
    code = exc.errno
    status: grpc.StatusCode
    if code in _FULL_ERRNOS:
        status = _C.RESOURCE_EXHAUSTED
        if shm_dir is not None:
            advice = _tmpfs_full(shm_dir, size)
        elif storage:
            advice = "out of space on the storage; free space on the shared disk or raise its quota"
        else:
            advice = "out of space or memory; free some or change the policy"
    elif code in _FD_ERRNOS:
        status, advice = _C.RESOURCE_EXHAUSTED, "too many open files; raise `ulimit -n`"
    elif isinstance(exc, FileExistsError) or code == errno.EEXIST:
        status, advice = _C.ALREADY_EXISTS, "already exists"
        if shm_dir is not None:
            advice += "; segment names must be unique (use new_segment_name())"
    elif isinstance(exc, PermissionError) or code in _PERMISSION_ERRNOS:
        status = _C.PERMISSION_DENIED
        if shm_dir is not None:
            advice = (
                "permission denied. Segments are private (mode 0o600) to the user that runs "
                "the node daemon; run this process as that user"
            )
        elif storage:
            advice = "access refused; check the credentials or file modes"
        else:
            advice = "access refused; check the path's permissions"
    elif isinstance(exc, FileNotFoundError) or code == errno.ENOENT:
        if shm_dir is not None and not os.path.isdir(shm_dir):
            status = _C.FAILED_PRECONDITION
            advice = (
                f"shared-memory directory {shm_dir} does not exist; mount a tmpfs there or "
                "configure another shm_dir"
            )
        elif shm_dir is not None:
            status = _C.NOT_FOUND
            advice = (
                "the segment does not exist: the artifact was deleted or the node daemon "
                "restarted; get the artifact again"
            )
        else:
            status, advice = _C.NOT_FOUND, "no such file or object"
    elif isinstance(exc, NotADirectoryError) or code == errno.ENOTDIR:
        status = _C.FAILED_PRECONDITION
        advice = "a part of the path is a file, not a directory; pass a directory"
    elif isinstance(exc, IsADirectoryError) or code == errno.EISDIR:
        status = _C.FAILED_PRECONDITION
        advice = "the path is a directory, not a file; pass a file"
    elif isinstance(exc, TimeoutError) or code == errno.ETIMEDOUT:
        status, advice = _C.DEADLINE_EXCEEDED, "timed out; retry, or give it a longer deadline"
    elif isinstance(exc, ConnectionError) or code in _CONNECTION_ERRNOS:
        status, advice = _C.UNAVAILABLE, "connection failed; the peer may be restarting -- retry"
    elif storage and code not in _PERMANENT_ERRNOS:
        status = _C.UNAVAILABLE
        advice = "the storage may be temporarily unreachable -- retry"
    else:
        status, advice = _C.INTERNAL, "unexpected OS error"
    return _make(status, _prefix(context, f"{advice} ({what})"))


#: botocore's errors for credentials that are missing or cannot be loaded (named, so that
#: mapping needs no botocore import).
_CREDENTIAL_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
)


def _is_missing_cloud_credentials(exc: BaseException) -> bool:
    return any(
        c.__module__.startswith("botocore") and c.__name__ in _CREDENTIAL_ERRORS
        for c in type(exc).__mro__
    )


def map_exception(exc: BaseException, *, context: str = "") -> ArtifactError:
    """The most specific ArtifactError for ``exc``.

    ArtifactErrors come back unchanged.  Anything else becomes a new error whose
    ``__cause__`` is ``exc``; ``context`` (what was being done, e.g. ``"get('llama:v1')"``)
    prefixes its message.  Use ``raise map_exception(e) from e`` or :func:`reraise_mapped`.
    """
    rex = _ray_exceptions()
    mapped: ArtifactError | None = None
    if rex is not None:
        mapped = _map_ray(exc, context, rex)
    if mapped is not None:
        return mapped
    if isinstance(exc, ArtifactError):
        return exc
    if isinstance(exc, grpc.RpcError):
        mapped = from_grpc_error(exc)
        if context:
            mapped = type(mapped)(
                _prefix(context, mapped.message), mapped.status_code, mapped.retryable
            )
    elif isinstance(exc, (concurrent.futures.TimeoutError, asyncio.TimeoutError)):
        mapped = _make(_C.DEADLINE_EXCEEDED, _prefix(context, f"timed out ({exc!r})"))
    elif isinstance(exc, OSError):
        mapped = map_os_error(exc, context)
    elif isinstance(exc, MemoryError):
        mapped = _make(_C.RESOURCE_EXHAUSTED, _prefix(context, "out of memory"))
    elif isinstance(exc, NotImplementedError):
        mapped = _make(_C.UNIMPLEMENTED, _prefix(context, f"not implemented yet: {exc}"))
    elif isinstance(exc, (asyncio.CancelledError, concurrent.futures.CancelledError)):
        mapped = _make(_C.CANCELLED, _prefix(context, "the call was cancelled"))
    elif _is_missing_cloud_credentials(exc):
        mapped = _make(
            _C.UNAUTHENTICATED,
            _prefix(
                context,
                f"the storage found no credentials ({exc}); pass key and secret in "
                "storage_options, set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a "
                "profile), or anon=True for a public bucket",
            ),
        )
    else:
        # ValueError, TypeError, KeyError ... reaching here were not raised by validation
        # (which raises InvalidArgumentError itself), so they are bugs.
        mapped = InternalError(
            _prefix(
                context,
                f"unexpected {type(exc).__name__}: {exc} -- this is a bug in tensorcast_ray; "
                "please report it",
            )
        )
    mapped.__cause__ = exc
    return mapped


def reraise_mapped(exc: BaseException) -> NoReturn:
    """Raise :func:`map_exception` of ``exc``, chained to it."""
    mapped = map_exception(exc)
    if mapped is exc:
        raise exc
    raise mapped from exc
