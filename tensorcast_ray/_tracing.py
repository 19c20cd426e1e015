"""Optional OpenTelemetry spans around the SDK verbs.  [SDK]

With the ``otel`` extra (``opentelemetry-api``) installed, each verb runs inside a span named
``Store/<Verb>`` -- ``Store/Put``, ``Store/Register``, ``Store/Get``, ``Store/GetInto``, ... --
from the tracer ``opentelemetry.trace.get_tracer("tensorcast_ray")``.  Spans go wherever the
application's tracer provider sends them; with no provider configured the API's default is a
no-op, so installing the extra alone costs next to nothing.  Without ``opentelemetry`` every
:func:`span` is a shared null context: no import, no allocation.

A span carries ``tensorcast.verb``; when an :class:`~tensorcast_ray._errors.ArtifactError`
escapes, also ``tensorcast.status_code`` (the gRPC code name) and ``tensorcast.retryable``.
The span records the exception and sets an error status (the OpenTelemetry default for
``start_as_current_span``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

from tensorcast_ray._errors import ArtifactError, InvalidArgumentError
from tensorcast_ray._retry import VERBS

__all__ = ["SPAN_NAMES", "TRACER_NAME", "enabled", "span", "span_name"]

TRACER_NAME = "tensorcast_ray"

#: Span name of each verb: ``Store/`` + the verb in CamelCase.
SPAN_NAMES: dict[str, str] = {
    verb: "Store/" + "".join(part.capitalize() for part in verb.split("_")) for verb in VERBS
}

_NULL: AbstractContextManager[None] = contextlib.nullcontext()
_UNSET: Any = object()
_lock = threading.Lock()
_tracer: Any = _UNSET  # _UNSET: not looked up yet; None: opentelemetry is not importable


def span_name(verb: str) -> str:
    """``"get_into"`` -> ``"Store/GetInto"``; an unknown verb is InvalidArgumentError."""
    try:
        return SPAN_NAMES[verb]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown verb {verb!r}; expected one of {', '.join(VERBS)}"
        ) from None


def _load_tracer() -> Any:
    global _tracer
    tracer = _tracer
    if tracer is not _UNSET:
        return tracer
    with _lock:
        if _tracer is _UNSET:
            try:
                from opentelemetry import trace
            except ImportError:
                _tracer = None
            else:
                # A ProxyTracer until the application sets a provider, then that provider's
                # tracer: caching it here still follows a provider set later.
                _tracer = trace.get_tracer(TRACER_NAME)
        return _tracer


def enabled() -> bool:
    """Whether spans are produced (``opentelemetry`` imports in this process)."""
    return _load_tracer() is not None


def _reset() -> None:
    """Forget the cached tracer (tests)."""
    global _tracer
    with _lock:
        _tracer = _UNSET


def span(verb: str) -> AbstractContextManager[Any]:
    """A context manager spanning one ``verb``; a no-op without ``opentelemetry``."""
    name = span_name(verb)
    tracer = _load_tracer()
    if tracer is None:
        return _NULL
    return _span(tracer, name, verb)


@contextlib.contextmanager
def _span(tracer: Any, name: str, verb: str) -> Iterator[Any]:
    with tracer.start_as_current_span(name) as current:
        current.set_attribute("tensorcast.verb", verb)
        try:
            yield current
        except ArtifactError as err:
            current.set_attribute("tensorcast.status_code", err.status_code.name)
            current.set_attribute("tensorcast.retryable", bool(err.retryable))
            raise
