"""Every lower-layer error maps to the intended ArtifactError; ours survive gRPC and pickling."""

from __future__ import annotations

import asyncio
import errno
import inspect
import pickle
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
import ray.exceptions as rex

from tensorcast_ray import _errors
from tensorcast_ray._error_mapping import (
    ERROR_CLASS_METADATA_KEY,
    RETRYABLE_METADATA_KEY,
    abort_with,
    from_grpc_error,
    grpc_abort_args,
    map_exception,
    reraise_mapped,
)
from tensorcast_ray._errors import (
    AbortedError,
    ArtifactError,
    InternalError,
    NotFoundError,
    UnavailableError,
)

C = grpc.StatusCode
ALL_ERROR_CLASSES = [
    obj
    for name in _errors.__all__
    if isinstance(obj := getattr(_errors, name), type) and issubclass(obj, ArtifactError)
]


class StandInRpcError(grpc.RpcError):
    """Stands in for grpc's _InactiveRpcError / AioRpcError: code, details, trailing metadata."""

    def __init__(
        self, code: grpc.StatusCode, details: str, metadata: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(details)
        self._code, self._details, self._metadata = code, details, tuple(metadata)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[Any, ...]:
        return self._metadata


# -- gRPC --------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_every_grpc_code_maps_to_an_error_with_that_code(code: grpc.StatusCode) -> None:
    rpc_error = StandInRpcError(code, "boom")
    err = map_exception(rpc_error)
    assert isinstance(err, ArtifactError)
    assert err.__cause__ is rpc_error
    if code is C.OK:
        assert type(err) is InternalError and err.status_code is C.INTERNAL
        assert "status OK" in err.message
    else:
        assert err.status_code is code
        assert err.retryable == (code in _errors.RETRYABLE_CODES)
        expected = {
            C.CANCELLED: _errors.AbortedError,
            C.OUT_OF_RANGE: _errors.InvalidArgumentError,
            C.UNAUTHENTICATED: _errors.PermissionDeniedError,
        }.get(code) or type(_errors.error_for_code(code, ""))
        assert type(err) is expected


def test_unavailable_message_names_target_and_what_to_do() -> None:
    err = from_grpc_error(StandInRpcError(C.UNAVAILABLE, "connect failed"), target="10.0.0.7:5055")
    assert isinstance(err, UnavailableError) and err.retryable
    assert "10.0.0.7:5055" in err.message and "connect failed" in err.message
    assert "tensorcast-ray daemon status" in err.message


@pytest.mark.parametrize("cls", ALL_ERROR_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("retryable", [True, False])
def test_abort_args_round_trip_keeps_class_code_and_flag(
    cls: type[ArtifactError], retryable: bool
) -> None:
    original = cls("key 'llama' is gone", None, retryable)
    code, details, metadata = grpc_abort_args(original)
    assert dict(metadata) == {
        ERROR_CLASS_METADATA_KEY: cls.__name__,
        RETRYABLE_METADATA_KEY: "1" if retryable else "0",
    }
    back = from_grpc_error(StandInRpcError(code, details, metadata))
    assert type(back) is cls
    assert back.status_code is original.status_code
    assert back.retryable is retryable
    assert back.message == original.message


def test_abort_args_of_foreign_subclass_send_nearest_known_class() -> None:
    class LeaseExpiredError(_errors.FailedPreconditionError):
        pass

    code, _, metadata = grpc_abort_args(LeaseExpiredError("lease expired"))
    assert code is C.FAILED_PRECONDITION
    assert dict(metadata)[ERROR_CLASS_METADATA_KEY] == "FailedPreconditionError"


def test_abort_args_never_send_ok() -> None:
    code, _, _ = grpc_abort_args(InternalError("odd", C.OK))
    assert code is C.INTERNAL


def test_metadata_cannot_name_a_class_outside_the_error_tree() -> None:
    err = from_grpc_error(
        StandInRpcError(C.NOT_FOUND, "x", [(ERROR_CLASS_METADATA_KEY, "SystemExit")])
    )
    assert type(err) is NotFoundError


def test_abort_with_calls_context_abort() -> None:
    class StandInContext:
        calls: list[tuple[Any, ...]] = []

        async def abort(self, code: Any, details: str, trailing_metadata: Any = ()) -> None:
            self.calls.append((code, details, trailing_metadata))
            raise RuntimeError("aborted")  # grpc.aio raises AbortError here

    ctx = StandInContext()
    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(abort_with(ctx, AbortedError("version conflict")))  # type: ignore[arg-type]
    assert ctx.calls == [
        (
            C.ABORTED,
            "version conflict",
            ((ERROR_CLASS_METADATA_KEY, "AbortedError"), (RETRYABLE_METADATA_KEY, "1")),
        )
    ]


# -- Ray ---------------------------------------------------------------------------------------

_HEX = "ab" * 28


class _StandInForeignError:
    """Stands in for Ray's RayException protobuf message from a Java worker."""

    language = 1  # protobuf Language.JAVA
    formatted_exception_string = "java.lang.IllegalStateException"


_RAY_ARGS: dict[str, tuple[Any, ...]] = {
    "ActorDiedError": (),
    "ActorUnavailableError": ("restarting", None),
    "CrossLanguageError": (_StandInForeignError(),),
    "ObjectFetchTimedOutError": (_HEX, None, ""),
    "ObjectFreedError": (_HEX, None, ""),
    "ObjectLostError": (_HEX, None, ""),
    "ObjectReconstructionFailedError": (_HEX,),
    "OwnerDiedError": (_HEX, None, ""),
    "ReferenceCountingAssertionError": (_HEX, None, ""),
    "RayCgraphCapacityExceeded": (ValueError("x"),),
    "RayChannelError": (ValueError("x"),),
    "RayChannelTimeoutError": (ValueError("x"),),
    "RayDirectTransportError": (ValueError("x"),),
    "RaySystemError": (ValueError("x"),),
    "StreamingGeneratorReplayInconsistentError": (ValueError("x"),),
    "TaskCancelledError": (),
    "RayTaskError": ("f", "traceback", FileNotFoundError("no /ckpt"), "proc", 1, "127.0.0.1"),
}

U, D, A = C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.ABORTED
R, F, INT = C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION, C.INTERNAL
#: (code, retryable) for every Ray exception class; a class Ray adds must be added here.
EXPECTED_RAY: dict[str, tuple[grpc.StatusCode, bool]] = {
    "ActorAlreadyExistsError": (C.ALREADY_EXISTS, False),
    "ActorDiedError": (U, True),
    "ActorHandleNotFoundError": (C.NOT_FOUND, False),
    "ActorPlacementGroupRemoved": (F, False),
    "ActorUnavailableError": (U, True),
    "ActorUnschedulableError": (F, False),
    "AsyncioActorExit": (U, True),
    "AuthenticationError": (C.UNAUTHENTICATED, False),
    "CrossLanguageError": (INT, False),
    "GetTimeoutError": (D, True),
    "LocalRayletDiedError": (U, False),
    "NodeDiedError": (U, True),
    "ObjectFetchTimedOutError": (D, True),
    "ObjectFreedError": (A, True),
    "ObjectLostError": (U, True),
    "ObjectReconstructionFailedError": (U, True),
    "ObjectRefStreamEndOfStreamError": (INT, False),
    "ObjectStoreFullError": (R, False),
    "OufOfBandObjectRefSerializationException": (INT, False),
    "OutOfDiskError": (R, False),
    "OutOfMemoryError": (R, False),
    "OwnerDiedError": (U, True),
    "PendingCallsLimitExceeded": (U, True),
    "PlasmaObjectNotAvailable": (U, True),
    "RayActorError": (U, True),
    "RayCgraphCapacityExceeded": (R, False),
    "RayChannelError": (U, True),
    "RayChannelTimeoutError": (D, True),
    "RayDirectTransportError": (U, True),
    "RayError": (INT, False),
    "RaySystemError": (INT, False),
    "RayTaskError": (C.NOT_FOUND, False),  # mapped through its cause (FileNotFoundError here)
    "ReferenceCountingAssertionError": (INT, False),
    "RpcError": (U, True),
    "RuntimeEnvSetupError": (F, False),
    "StreamingGeneratorReplayInconsistentError": (INT, False),
    "TaskCancelledError": (C.CANCELLED, False),
    "TaskPlacementGroupRemoved": (F, False),
    "TaskUnschedulableError": (F, False),
    "UnserializableException": (INT, False),
    "UserCodeException": (INT, False),
    "WorkerCrashedError": (U, True),
}

RAY_CLASSES = {
    name: cls
    for name, cls in inspect.getmembers(rex, inspect.isclass)
    if issubclass(cls, Exception) and cls.__module__ == "ray.exceptions"
}


def test_expected_table_covers_every_ray_exception_class() -> None:
    assert set(RAY_CLASSES) == set(EXPECTED_RAY), "map the new Ray classes and list them here"


@pytest.mark.parametrize("name", sorted(RAY_CLASSES))
def test_every_ray_exception_maps_to_a_specific_code(name: str) -> None:
    cls = RAY_CLASSES[name]
    exc = cls(*_RAY_ARGS.get(name, ("boom",)))
    err = map_exception(exc, context="get('llama')")
    code, retryable = EXPECTED_RAY[name]
    assert (err.status_code, err.retryable) == (code, retryable)
    assert err.__cause__ is exc
    assert err.message.startswith("get('llama'): ")


def test_ray_task_error_returns_its_artifact_error_cause_unchanged() -> None:
    cause = _errors.ResourceExhaustedError("tier full", None, True)
    rte = rex.RayTaskError("put", "tb", cause, "proc", 1, "127.0.0.1")
    for exc in (rte, rte.as_instanceof_cause()):
        assert map_exception(exc) is cause
    assert cause.retryable is True and cause.status_code is C.RESOURCE_EXHAUSTED


def test_actor_whose_constructor_failed_is_not_retried() -> None:
    exc = rex.RayActorError(actor_init_failed=True)
    err = map_exception(exc)
    assert err.status_code is C.FAILED_PRECONDITION and not err.retryable


def test_ray_rpc_error_keeps_its_grpc_code() -> None:
    err = map_exception(rex.RpcError("denied", rpc_code=C.PERMISSION_DENIED.value[0]))
    assert err.status_code is C.PERMISSION_DENIED and not err.retryable


# -- OS and the rest ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (FileNotFoundError(errno.ENOENT, "gone", "/ckpt"), C.NOT_FOUND),
        (PermissionError(errno.EACCES, "no", "/ckpt"), C.PERMISSION_DENIED),
        (FileExistsError(errno.EEXIST, "there", "/ckpt"), C.ALREADY_EXISTS),
        (OSError(errno.ENOSPC, "No space left on device"), C.RESOURCE_EXHAUSTED),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), C.RESOURCE_EXHAUSTED),
        (TimeoutError("slow"), C.DEADLINE_EXCEEDED),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), C.UNAVAILABLE),
        (ConnectionResetError(errno.ECONNRESET, "reset"), C.UNAVAILABLE),
        (IsADirectoryError(errno.EISDIR, "dir"), C.FAILED_PRECONDITION),
        (OSError(errno.EIO, "I/O error"), C.INTERNAL),
        (ValueError("bad"), C.INTERNAL),
        (TypeError("bad"), C.INTERNAL),
        (KeyError("k"), C.INTERNAL),
        (MemoryError(), C.RESOURCE_EXHAUSTED),
        (NotImplementedError("gpu tier"), C.UNIMPLEMENTED),
        (asyncio.CancelledError(), C.CANCELLED),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.name,
)
def test_os_and_other_errors(exc: BaseException, code: grpc.StatusCode) -> None:
    err = map_exception(exc, context="export")
    assert err.status_code is code
    assert err.retryable == (code in _errors.RETRYABLE_CODES)
    assert err.__cause__ is exc
    assert err.message.startswith("export: ")


def test_artifact_error_passes_through_unchanged() -> None:
    err = NotFoundError("no key")
    assert map_exception(err, context="get") is err


def test_reraise_mapped_chains_the_original() -> None:
    original = FileNotFoundError("/ckpt")
    with pytest.raises(NotFoundError) as info:
        reraise_mapped(original)
    assert info.value.__cause__ is original

    ours = UnavailableError("down")
    with pytest.raises(UnavailableError) as info2:
        reraise_mapped(ours)
    assert info2.value is ours and ours.__cause__ is None


# -- pickling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_pickles(cls: type[ArtifactError]) -> None:
    for retryable in (True, False):
        original = cls("something failed", None, retryable)
        back = pickle.loads(pickle.dumps(original))
        assert type(back) is cls
        assert (back.status_code, back.message, back.retryable) == (
            original.status_code,
            original.message,
            retryable,
        )
