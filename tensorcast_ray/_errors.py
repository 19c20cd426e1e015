"""Errors every caller of tensorcast_ray sees.  [SDK, daemon, Global Store]

The whole tree::

    ArtifactError                      (status_code, retryable)
    ├── InvalidArgumentError           INVALID_ARGUMENT     input validation; fix the call
    ├── FailedPreconditionError        FAILED_PRECONDITION  state mismatch; fix the setup
    ├── NotFoundError (also KeyError)  NOT_FOUND            missing artifact / key / path
    ├── AlreadyExistsError             ALREADY_EXISTS       a version is immutable
    ├── ResourceExhaustedError         RESOURCE_EXHAUSTED   capacity; free space or change policy
    ├── PermissionDeniedError          PERMISSION_DENIED    OS / storage refused access
    ├── UnavailableError               UNAVAILABLE          transient; retried within a deadline
    ├── DeadlineExceededError          DEADLINE_EXCEEDED    transient; retried within a deadline
    ├── AbortedError                   ABORTED              transient conflict; retried
    ├── DataLossError                  DATA_LOSS            integrity mismatch; never wrong bytes
    ├── UnimplementedError             UNIMPLEMENTED        the tier or feature is not built
    └── InternalError                  INTERNAL / UNKNOWN / others: a bug; please report it

Every error pickles with its class, code, message and ``retryable`` flag, so it survives a
Ray actor boundary.  Lower-layer errors (gRPC, Ray, OS) are mapped once, at the boundary,
by :mod:`tensorcast_ray._error_mapping`.
"""

from __future__ import annotations

from typing import Any

import grpc

__all__ = [
    "RETRYABLE_CODES",
    "AbortedError",
    "AlreadyExistsError",
    "ArtifactError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnavailableError",
    "UnimplementedError",
    "error_for_code",
]

#: Codes that may clear with time. Only these are ever retried.
RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)


class ArtifactError(Exception):
    """Base of every tensorcast_ray error.

    ``status_code`` is a :class:`grpc.StatusCode`; ``retryable`` says whether the same
    call may succeed later (defaults to whether the code is transient).
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        status_code: grpc.StatusCode | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code: grpc.StatusCode = status_code or self.default_code
        self.retryable: bool = (
            self.status_code in RETRYABLE_CODES if retryable is None else bool(retryable)
        )

    def __str__(self) -> str:
        return f"[{self.status_code.name}] {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status_code={self.status_code}, "
            f"retryable={self.retryable})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the subclass, code and flag across pickling (Ray, multiprocessing).
        return (_rebuild, (type(self), self.message, self.status_code.name, self.retryable))


def _rebuild(
    cls: type[ArtifactError], message: str, code_name: str, retryable: bool
) -> ArtifactError:
    return cls(message, grpc.StatusCode[code_name], retryable)


class InvalidArgumentError(ArtifactError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPreconditionError(ArtifactError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class NotFoundError(ArtifactError, KeyError):
    default_code = grpc.StatusCode.NOT_FOUND

    # KeyError.__str__ would quote the message; keep ArtifactError's.
    __str__ = ArtifactError.__str__


class AlreadyExistsError(ArtifactError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhaustedError(ArtifactError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDeniedError(ArtifactError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(ArtifactError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ArtifactError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class AbortedError(ArtifactError):
    default_code = grpc.StatusCode.ABORTED


class DataLossError(ArtifactError):
    default_code = grpc.StatusCode.DATA_LOSS


class UnimplementedError(ArtifactError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(ArtifactError):
    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ArtifactError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        FailedPreconditionError,
        NotFoundError,
        AlreadyExistsError,
        ResourceExhaustedError,
        PermissionDeniedError,
        UnavailableError,
        DeadlineExceededError,
        AbortedError,
        DataLossError,
        UnimplementedError,
        InternalError,
    )
}


def error_for_code(
    code: grpc.StatusCode, message: str, retryable: bool | None = None
) -> ArtifactError:
    """The most specific ``ArtifactError`` for ``code`` (``InternalError`` for the rest)."""
    cls = _BY_CODE.get(code, InternalError)
    return cls(message, code, retryable)
