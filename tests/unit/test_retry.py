"""The retry loop: which errors it retries, when it stops, how long it sleeps."""

from __future__ import annotations

import random
from collections.abc import Callable

import grpc
import pytest

from tensorcast_ray import _errors
from tensorcast_ray._errors import (
    ArtifactError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from tensorcast_ray._retry import (
    DEFAULT_RETRY_POLICIES,
    VERBS,
    Retrier,
    RetryPolicy,
    backoff_delay,
    call_with_retry,
    resolve_policy,
    should_retry,
)

C = grpc.StatusCode


class FakeClock:
    """Time that moves only when the code under test sleeps (or a call is said to take time)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(float(seconds))
        self.now += seconds


def failing(
    errors: list[BaseException],
    result: str = "ok",
    cost: float = 0.0,
    clock: FakeClock | None = None,
) -> tuple[Callable[[float], str], list[float]]:
    """fn raising ``errors`` in turn, then returning ``result``; records the remaining budget."""
    seen: list[float] = []

    def fn(remaining: float) -> str:
        seen.append(remaining)
        if clock is not None:
            clock.now += cost
        if errors:
            raise errors.pop(0)
        return result

    return fn, seen


def run(fn: Callable[[float], str], policy: RetryPolicy, clock: FakeClock, **kw: object) -> str:
    return call_with_retry(
        fn,
        verb="get",
        policy=policy,
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(7),
        **kw,  # type: ignore[arg-type]
    )


# -- RetryPolicy --------------------------------------------------------------------------------


def test_policy_positional_order() -> None:
    p = RetryPolicy(20.0, 2, 0.1, 2.0, 0.5)
    assert (p.deadline_seconds, p.max_attempts, p.base_backoff_seconds) == (20.0, 2, 0.1)
    assert (p.backoff_multiplier, p.jitter) == (2.0, 0.5)


@pytest.mark.parametrize(
    "args",
    [
        (0.0, 1),
        (-1.0, 1),
        (float("inf"), 1),
        (float("nan"), 1),
        (10.0, 0),
        (10.0, True),
        (10.0, 1.5),
        (10.0, 1, -0.1),
        (10.0, 1, 0.1, 0.5),
        (10.0, 1, 0.1, 2.0, -0.1),
        (10.0, 1, 0.1, 2.0, 1.5),
    ],
)
def test_policy_validation(args: tuple[object, ...]) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid RetryPolicy"):
        RetryPolicy(*args)  # type: ignore[arg-type]


def test_policy_is_frozen() -> None:
    with pytest.raises(AttributeError):
        RetryPolicy(1.0, 1).max_attempts = 3  # type: ignore[misc]


def test_defaults() -> None:
    assert set(DEFAULT_RETRY_POLICIES) == set(VERBS)
    expected = {"register": (30.0, 2), "put": (45.0, 2), "get": (40.0, 3), "get_into": (40.0, 3)}
    for verb, (deadline, attempts) in expected.items():
        p = DEFAULT_RETRY_POLICIES[verb]
        assert (p.deadline_seconds, p.max_attempts) == (deadline, attempts)


def test_resolve_policy_overrides_and_rejects_unknown_verbs() -> None:
    mine = RetryPolicy(20.0, 2, 0.1, 2.0, 0.5)
    assert resolve_policy("get", {"get": mine}) is mine
    assert resolve_policy("put", {"get": mine}) is DEFAULT_RETRY_POLICIES["put"]
    with pytest.raises(InvalidArgumentError, match="unknown verb"):
        resolve_policy("fetch")
    with pytest.raises(InvalidArgumentError, match="unknown verbs"):
        resolve_policy("get", {"gett": mine})
    with pytest.raises(InvalidArgumentError, match="must be a RetryPolicy"):
        resolve_policy("get", {"get": (20.0, 2)})  # type: ignore[dict-item]


# -- should_retry / backoff_delay ---------------------------------------------------------------

POLICY = RetryPolicy(10.0, 3)


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c is not C.OK], ids=lambda c: c.name
)
def test_should_retry_by_code(code: grpc.StatusCode) -> None:
    err = _errors.error_for_code(code, "x")
    assert should_retry(err, 1, 0.0, 0.1, POLICY) == (
        code in (C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.ABORTED)
    )


def test_should_retry_needs_retryable_flag_and_artifact_error() -> None:
    assert not should_retry(UnavailableError("x", retryable=False), 1, 0.0, 0.1, POLICY)
    assert not should_retry(NotFoundError("x", retryable=True), 1, 0.0, 0.1, POLICY)
    assert not should_retry(ConnectionError("x"), 1, 0.0, 0.1, POLICY)


def test_should_retry_budget() -> None:
    err = UnavailableError("x")
    assert should_retry(err, 2, 0.0, 0.1, POLICY)
    assert not should_retry(err, 3, 0.0, 0.1, POLICY)  # attempts spent
    assert should_retry(err, 1, 9.0, 0.9, POLICY)
    assert not should_retry(err, 1, 9.0, 1.0, POLICY)  # would wake at the deadline


def test_backoff_grows_within_jitter_bounds() -> None:
    policy = RetryPolicy(100.0, 10, 0.1, 2.0, 0.5)
    rng = random.Random(3)
    for attempt in range(1, 8):
        nominal = 0.1 * 2.0 ** (attempt - 1)
        delays = [backoff_delay(attempt, policy, rng) for _ in range(200)]
        assert all(0.5 * nominal <= d <= nominal for d in delays)
        assert max(delays) - min(delays) > 0.3 * nominal  # jitter actually spreads them


def test_backoff_without_jitter_is_exact_and_rejects_attempt_zero() -> None:
    policy = RetryPolicy(100.0, 10, 0.25, 3.0, 0.0)
    rng = random.Random(0)
    assert [backoff_delay(n, policy, rng) for n in (1, 2, 3)] == [0.25, 0.75, 2.25]
    with pytest.raises(InvalidArgumentError):
        backoff_delay(0, policy, rng)


# -- call_with_retry ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.ABORTED])
def test_transient_errors_are_retried_until_success(code: grpc.StatusCode) -> None:
    clock = FakeClock()
    fn, seen = failing([_errors.error_for_code(code, "blip")] * 2, clock=clock)
    assert run(fn, RetryPolicy(10.0, 3), clock) == "ok"
    assert len(seen) == 3 and len(clock.sleeps) == 2
    assert clock.sleeps[1] > clock.sleeps[0] * 0.5  # second backoff's nominal value doubles
    assert seen[0] == 10.0 and seen[2] == pytest.approx(10.0 - sum(clock.sleeps))


@pytest.mark.parametrize(
    "code", [C.NOT_FOUND, C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED, C.DATA_LOSS, C.INTERNAL]
)
def test_other_errors_are_raised_at_once(code: grpc.StatusCode) -> None:
    clock = FakeClock()
    err = _errors.error_for_code(code, "nope")
    fn, seen = failing([err], clock=clock)
    with pytest.raises(ArtifactError) as info:
        run(fn, RetryPolicy(10.0, 3), clock)
    assert info.value is err
    assert len(seen) == 1 and clock.sleeps == []


def test_lower_layer_errors_are_mapped_first() -> None:
    clock = FakeClock()
    original = ConnectionRefusedError("refused")
    fn, _ = failing([original], clock=clock)
    assert run(fn, RetryPolicy(10.0, 2), clock) == "ok"  # UNAVAILABLE -> retried
    fn, _ = failing([FileNotFoundError("/ckpt")], clock=clock)
    with pytest.raises(NotFoundError) as info:
        run(fn, RetryPolicy(10.0, 2), clock)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert info.value.message.startswith("get: ")


def test_attempts_exhausted_keeps_class_and_says_so() -> None:
    clock = FakeClock()
    last = UnavailableError("daemon down")
    fn, seen = failing([UnavailableError("first"), UnavailableError("second"), last], clock=clock)
    with pytest.raises(UnavailableError) as info:
        run(fn, RetryPolicy(40.0, 3), clock)
    err = info.value
    assert len(seen) == 3
    assert err.message.startswith("get: gave up after 3 attempts in ")
    assert err.message.endswith("daemon down")
    assert err.__cause__ is last
    assert err.retryable and err.status_code is C.UNAVAILABLE


def test_deadline_exhausted_before_attempts() -> None:
    clock = FakeClock()
    # Each attempt costs 4 s of a 10 s deadline: the third would start too late.
    fn, seen = failing([DeadlineExceededError("slow")] * 5, clock=clock, cost=4.0)
    with pytest.raises(DeadlineExceededError, match=r"gave up after 2 attempts in 9\.0 s"):
        run(fn, RetryPolicy(10.0, 5, 1.0, 2.0, 0.0), clock)
    assert len(seen) == 2 and clock.sleeps == [1.0]
    assert seen[1] == pytest.approx(10.0 - 4.0 - 1.0)


def test_hooks_are_called_between_attempts() -> None:
    clock = FakeClock()
    errs = [UnavailableError("a"), _errors.AbortedError("b")]
    fn, _ = failing(list(errs), clock=clock)
    retries: list[tuple[str, str, int]] = []
    reconnects: list[str] = []
    run(
        fn,
        RetryPolicy(10.0, 3),
        clock,
        on_retry=lambda verb, err, n: retries.append((verb, err.message, n)),
        before_retry=lambda err: reconnects.append(err.message),
    )
    assert retries == [("get", "a", 1), ("get", "b", 2)]
    assert reconnects == ["a", "b"]


def test_failing_before_retry_counts_as_a_failed_attempt() -> None:
    clock = FakeClock()
    fn, seen = failing([UnavailableError("down")], clock=clock)

    def reconnect(err: ArtifactError) -> None:
        raise ConnectionRefusedError("still down")

    with pytest.raises(UnavailableError, match="gave up after 2 attempts") as info:
        run(fn, RetryPolicy(10.0, 2), clock, before_retry=reconnect)
    assert len(seen) == 1
    assert isinstance(info.value.__cause__, UnavailableError)
    assert isinstance(info.value.__cause__.__cause__, ConnectionRefusedError)


def test_keyboard_interrupt_is_not_swallowed() -> None:
    clock = FakeClock()
    fn, seen = failing([KeyboardInterrupt()], clock=clock)
    with pytest.raises(KeyboardInterrupt):
        run(fn, RetryPolicy(10.0, 3), clock)
    assert len(seen) == 1


def test_retrier_uses_overrides() -> None:
    clock = FakeClock()
    retrier = Retrier(
        {"get": RetryPolicy(5.0, 2, 0.0)}, clock=clock, sleep=clock.sleep, rng=random.Random(1)
    )
    assert retrier.policy_for("put") is DEFAULT_RETRY_POLICIES["put"]
    fn, seen = failing([UnavailableError("x")] * 3, clock=clock)
    with pytest.raises(UnavailableError, match="gave up after 2 attempts"):
        retrier.call("get", fn)
    assert len(seen) == 2
    with pytest.raises(InvalidArgumentError):
        retrier.policy_for("fetch")


def test_a_first_attempt_that_succeeds_or_fails_for_good_never_enters_the_retry_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop's machinery costs more than a small control call: only a failure worth
    retrying may pay for it."""
    import tenacity

    def no_loop(*args: object, **kwargs: object) -> None:
        raise AssertionError("tenacity.Retrying was built for a first attempt")

    monkeypatch.setattr(tenacity, "Retrying", no_loop)
    clock = FakeClock()
    fn, _ = failing([], clock=clock)
    assert run(fn, RetryPolicy(10.0, 3), clock) == "ok"
    fn, _ = failing([_errors.error_for_code(C.NOT_FOUND, "gone")], clock=clock)
    with pytest.raises(_errors.NotFoundError):
        run(fn, RetryPolicy(10.0, 3), clock)
    monkeypatch.undo()
    fn, seen = failing([_errors.error_for_code(C.UNAVAILABLE, "blip")], clock=clock)
    assert run(fn, RetryPolicy(10.0, 3), clock) == "ok" and len(seen) == 2
