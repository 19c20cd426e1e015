"""Bounded retries with a deadline, backoff and jitter for each SDK verb.  [SDK]

One verb call, step by step (``call_with_retry(fn, verb="get", policy=get_policy)``)::

    attempt 1   fn(remaining=40.0)  -> UnavailableError (daemon restarting)
                should_retry? retryable, code UNAVAILABLE, 1 < 3 attempts, 0.1 + 0.07 < 40 s
                on_retry("get", err, 1); sleep(0.07)   # backoff_delay(1) with jitter
    attempt 2   before_retry(err)                       # e.g. re-resolve the daemon address
                fn(remaining=39.8)  -> result

Only errors that may clear with time are retried: an ArtifactError with ``retryable=True``
and a code among UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED.  Every other error is raised at once.

When the budget runs out (attempts or deadline) on a retryable error, the error raised has the
last error's class, code and retryable flag, a message that starts with
``"<verb>: gave up after N attempts in T s (policy: M attempts / D s): "`` and ``__cause__``
set to the last error.  The class stays so ``except UnavailableError`` still works; the message
says the SDK already spent its budget.

``put`` and ``register`` get two attempts only. Their retries are safe: every attempt of one
write carries the same request id, so the daemon aborts an attempt whose reply was lost, or
answers with the committed result instead of ALREADY_EXISTS (``_store.Store._write_segments``).

The loop is ``tenacity.Retrying`` with our stop / wait / retry callables, entered only after
a first attempt failed with an error worth retrying (the first attempt is a plain call: the
loop's machinery costs more than a small control round trip); time, sleep and randomness
are injected so tests run without waiting.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

import grpc
import tenacity

from tensorcast_ray._error_mapping import map_exception
from tensorcast_ray._errors import ArtifactError, InvalidArgumentError

__all__ = [
    "DEFAULT_RETRY_POLICIES",
    "RETRIED_CODES",
    "VERBS",
    "Retrier",
    "RetryPolicy",
    "backoff_delay",
    "call_with_retry",
    "resolve_policy",
    "should_retry",
]

T = TypeVar("T")

#: Every SDK verb, spelled once.  Metrics labels and retry policies use these names.
VERBS: tuple[str, ...] = (
    "put",
    "register",
    "get",
    "get_into",
    "artifact",
    "exists",
    "delete",
    "list_keys",
    "export",
    "import",
    "replicate",
    "persistence_status",
    "wait_for",
    "hold",
)

#: Codes the loop retries (when the error also says ``retryable=True``).
RETRIED_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often one verb may be tried.

    ``deadline_seconds`` bounds the whole call including sleeps; ``max_attempts`` counts the
    first try.  The sleep after attempt ``n`` is
    ``base_backoff_seconds * backoff_multiplier ** (n - 1) * (1 - jitter * U)``, ``U`` uniform
    in [0, 1): jitter 0.5 spreads each sleep over [50 %, 100 %] of the nominal value, so
    workers that failed together do not retry together.
    """

    deadline_seconds: float
    max_attempts: int
    base_backoff_seconds: float = 0.1
    backoff_multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if not _finite(self.deadline_seconds) or self.deadline_seconds <= 0:
            problems.append(
                f"deadline_seconds must be a finite number > 0, got {self.deadline_seconds!r}"
            )
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            problems.append(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if not _finite(self.base_backoff_seconds) or self.base_backoff_seconds < 0:
            problems.append(
                "base_backoff_seconds must be a finite number >= 0, "
                f"got {self.base_backoff_seconds!r}"
            )
        if not _finite(self.backoff_multiplier) or self.backoff_multiplier < 1:
            problems.append(
                f"backoff_multiplier must be a finite number >= 1, got {self.backoff_multiplier!r}"
            )
        if not _finite(self.jitter) or not 0 <= self.jitter <= 1:
            problems.append(f"jitter must be within [0, 1], got {self.jitter!r}")
        if problems:
            raise InvalidArgumentError("invalid RetryPolicy: " + "; ".join(problems))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: Defaults per verb.  Metadata-only verbs (exists, list_keys, delete) get short deadlines;
#: export / import move whole checkpoints through fsspec and get long ones -- override them for
#: checkpoints that take longer than five minutes to copy.
DEFAULT_RETRY_POLICIES: Mapping[str, RetryPolicy] = MappingProxyType(
    {
        "register": RetryPolicy(30.0, 2),
        "put": RetryPolicy(45.0, 2),
        "get": RetryPolicy(40.0, 3),
        "get_into": RetryPolicy(40.0, 3),
        "artifact": RetryPolicy(40.0, 3),
        "exists": RetryPolicy(10.0, 3),
        "list_keys": RetryPolicy(15.0, 3),
        "delete": RetryPolicy(20.0, 2),
        "export": RetryPolicy(300.0, 2, 1.0),
        "import": RetryPolicy(300.0, 2, 1.0),
        # Moves whole artifacts between nodes, like export / import.
        "replicate": RetryPolicy(600.0, 2, 1.0),
        # One status call may wait up to 10 s for its task (wait_persisted loops over it).
        "persistence_status": RetryPolicy(30.0, 3),
        # One held WaitLatest call (up to 10 s); Subscriber.wait_for loops to its own timeout.
        "wait_for": RetryPolicy(40.0, 4),
        # Reader holds around a Subscriber.pull / weights.reading (metadata only); rides out
        # a Global Store restart (it rebuilds its catalog for up to 30 s).
        "hold": RetryPolicy(60.0, 8, 0.5),
    }
)


def resolve_policy(verb: str, overrides: Mapping[str, RetryPolicy] | None = None) -> RetryPolicy:
    """The policy for ``verb``: ``overrides[verb]`` if given, else the default."""
    if verb not in DEFAULT_RETRY_POLICIES:
        raise InvalidArgumentError(f"unknown verb {verb!r}; expected one of {', '.join(VERBS)}")
    if overrides:
        unknown = sorted(set(overrides) - set(DEFAULT_RETRY_POLICIES))
        if unknown:
            raise InvalidArgumentError(
                f"retry_overrides names unknown verbs {unknown}; "
                f"expected some of {', '.join(VERBS)}"
            )
        override = overrides.get(verb)
        if override is not None:
            if not isinstance(override, RetryPolicy):
                raise InvalidArgumentError(
                    f"retry_overrides[{verb!r}] must be a RetryPolicy, "
                    f"got {type(override).__name__}"
                )
            return override
    return DEFAULT_RETRY_POLICIES[verb]


def should_retry(
    err: BaseException, attempt: int, elapsed: float, next_delay: float, policy: RetryPolicy
) -> bool:
    """Whether to try again after attempt number ``attempt`` (1-based) failed with ``err``.

    Pure.  ``elapsed`` is the time since the first attempt began; ``next_delay`` the sleep
    that would come before the next attempt.
    """
    return (
        isinstance(err, ArtifactError)
        and err.retryable
        and err.status_code in RETRIED_CODES
        and attempt < policy.max_attempts
        and elapsed + next_delay < policy.deadline_seconds
    )


def backoff_delay(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Seconds to sleep after attempt ``attempt`` (1-based) failed; see :class:`RetryPolicy`."""
    if attempt < 1:
        raise InvalidArgumentError(f"attempt numbers start at 1, got {attempt}")
    nominal = policy.base_backoff_seconds * policy.backoff_multiplier ** (attempt - 1)
    return nominal * (1.0 - policy.jitter * rng.random())


def _is_retryable_kind(err: BaseException | None) -> bool:
    return isinstance(err, ArtifactError) and err.retryable and err.status_code in RETRIED_CODES


def call_with_retry(
    fn: Callable[[float], T],
    *,
    verb: str,
    policy: RetryPolicy,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    on_retry: Callable[[str, ArtifactError, int], None] | None = None,
    before_retry: Callable[[ArtifactError], None] | None = None,
) -> T:
    """Call ``fn(remaining_seconds)`` until it succeeds or ``policy`` says stop.

    ``fn`` gets the seconds left before the deadline (pass it on as the gRPC timeout).  Its
    exceptions go through :func:`map_exception`.  ``on_retry(verb, err, attempt)`` runs before
    each sleep (count retries there); ``before_retry(err)`` runs before each new attempt, and
    if it raises, that counts as the attempt's failure (so a failed reconnect is retried too).
    """
    rng = rng if rng is not None else random.Random()
    start = clock()
    last: list[ArtifactError] = []

    def attempt() -> T:
        try:
            if last and before_retry is not None:
                before_retry(last[-1])
            return fn(max(policy.deadline_seconds - (clock() - start), 0.0))
        except Exception as exc:
            mapped = map_exception(exc, context=verb)
            last.append(mapped)
            if mapped is exc:
                raise
            raise mapped from exc

    # The first attempt runs outside tenacity: its machinery costs ~34 us a call, more than
    # a whole small control round trip. Only a failure worth retrying enters the loop below,
    # whose attempt numbers start at 2.
    try:
        return attempt()
    except ArtifactError as first:
        if not _is_retryable_kind(first):
            raise
        delay = backoff_delay(1, policy, rng)
        if not should_retry(first, 1, clock() - start, delay, policy):
            raise _gave_up(verb, first, 1, clock() - start, policy) from first
        if on_retry is not None:
            on_retry(verb, first, 1)
        sleep(delay)

    def retry(state: tenacity.RetryCallState) -> bool:
        outcome = state.outcome
        return outcome is not None and outcome.failed and _is_retryable_kind(outcome.exception())

    def wait(state: tenacity.RetryCallState) -> float:
        return backoff_delay(state.attempt_number + 1, policy, rng)

    def stop(state: tenacity.RetryCallState) -> bool:
        err = state.outcome.exception() if state.outcome is not None else None
        assert err is not None  # stop runs only after retry() accepted a failure
        return not should_retry(
            err, state.attempt_number + 1, clock() - start, state.upcoming_sleep, policy
        )

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None:
            on_retry(verb, last[-1], state.attempt_number + 1)

    retrying = tenacity.Retrying(
        stop=stop, wait=wait, retry=retry, before_sleep=before_sleep, sleep=sleep
    )
    try:
        return retrying(attempt)
    except tenacity.RetryError as gave_up:
        last_err = gave_up.last_attempt.exception()
        assert isinstance(last_err, ArtifactError)
        attempts = gave_up.last_attempt.attempt_number + 1
        raise _gave_up(verb, last_err, attempts, clock() - start, policy) from last_err


def _gave_up(
    verb: str, err: ArtifactError, attempts: int, elapsed: float, policy: RetryPolicy
) -> ArtifactError:
    message = (
        f"{verb}: gave up after {attempts} attempt{'s' if attempts != 1 else ''} in "
        f"{elapsed:.1f} s (policy: {policy.max_attempts} attempts / "
        f"{policy.deadline_seconds:.1f} s): {err.message}"
    )
    return type(err)(message, err.status_code, err.retryable)


class Retrier:
    """``call_with_retry`` bound to per-verb policies and hooks, for one store.  [SDK]"""

    def __init__(
        self,
        overrides: Mapping[str, RetryPolicy] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        on_retry: Callable[[str, ArtifactError, int], None] | None = None,
        before_retry: Callable[[ArtifactError], None] | None = None,
    ) -> None:
        self._policies = {verb: resolve_policy(verb, overrides) for verb in VERBS}
        self._clock = clock
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._on_retry = on_retry
        self._before_retry = before_retry

    def policy_for(self, verb: str) -> RetryPolicy:
        try:
            return self._policies[verb]
        except KeyError:
            raise InvalidArgumentError(
                f"unknown verb {verb!r}; expected one of {', '.join(VERBS)}"
            ) from None

    def call(self, verb: str, fn: Callable[[float], T], policy: RetryPolicy | None = None) -> T:
        """Run ``fn`` under ``policy`` (default: this store's policy for ``verb``)."""
        return call_with_retry(
            fn,
            verb=verb,
            policy=policy if policy is not None else self.policy_for(verb),
            clock=self._clock,
            sleep=self._sleep,
            rng=self._rng,
            on_retry=self._on_retry,
            before_retry=self._before_retry,
        )
