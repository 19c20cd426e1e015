"""Persistence tasks: what each must place and how far it got, a pure table.  [daemon]

A put or register whose policy names tiers beyond this node's stable DRAM (shared disk, a
stable copy on another node) returns once the local copy is in; a *persistence task* then
places the rest in the background (:mod:`tensorcast_ray.daemon.persist_runner` is the shell
that does the I/O). This table holds every task's state and decides its outcome; it does no
I/O and reads no clock (every event carries its ``now_ms``).

A task's life: ``pending`` (queued) → ``running`` → ``success`` (every tier placed) |
``degraded`` (a ``should`` tier failed, every ``must`` tier placed) | ``failed`` (a ``must``
tier failed, or the artifact was deleted first). A ``may`` tier that fails is logged and
otherwise silent. Its *shards* are the units it places: one per shard file on shared disk
(``target`` = the file's URL) and one per remote stable replica (``target`` = the node id);
each has its own state, progress and attempt count (a failed shard is retried alone).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tensorcast_ray._policy import ResolvedPolicy

__all__ = [
    "SHARD_STATES",
    "TASK_STATES",
    "TERMINAL_STATES",
    "PersistTask",
    "PersistenceTable",
    "ShardStatus",
    "TaskPlan",
    "plan_task",
]

TASK_STATES = ("pending", "running", "success", "degraded", "failed")
TERMINAL_STATES = frozenset({"success", "degraded", "failed"})
SHARD_STATES = ("pending", "running", "retrying", "success", "failed")
_NOT_DONE = 0.999  # the most progress a unit shows before it is placed


@dataclass(frozen=True)
class TaskPlan:
    """The tiers a policy leaves to a persistence task, with how hard each is required."""

    disk: str | None = None  # requirement of the shared_disk tier, if any
    remote: str | None = None  # requirement of the remote stable_dram tier, if any
    remote_replicas: int = 0  # copies on other nodes the remote tier asks for

    def __bool__(self) -> bool:
        return self.disk is not None or self.remote is not None


def plan_task(policy: ResolvedPolicy) -> TaskPlan:
    """What a persistence task must do for ``policy`` (falsy: no task)."""
    disk = remote = None
    replicas = 0
    for tier in policy.tiers:
        if tier.tier == "shared_disk":
            disk = tier.requirement
        elif tier.tier == "stable_dram" and tier.scope != "local":
            remote, replicas = tier.requirement, tier.min_replicas
    return TaskPlan(disk, remote, replicas)


@dataclass
class ShardStatus:
    index: int
    tier: str  # "shared_disk" or "stable_dram" (a remote replica)
    target: str  # the shard file's URL, or the node the replica goes to
    state: str = "pending"
    done_bytes: int = 0
    total_bytes: int = 0
    attempts: int = 0
    error: str = ""

    @property
    def progress(self) -> float:
        """0..1; 1 only once placed (every byte handed over is not yet every byte stored:
        an object store publishes a file when its upload completes)."""
        if self.state == "success":
            return 1.0
        if not self.total_bytes:
            return 0.0
        return min(_NOT_DONE, self.done_bytes / self.total_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "tier": self.tier,
            "target": self.target,
            "state": self.state,
            "progress": self.progress,
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "attempts": self.attempts,
            "error": self.error,
        }


@dataclass
class PersistTask:
    task_id: str
    key: str
    artifact_id: str
    nbytes: int
    plan: TaskPlan
    created_ms: int
    state: str = "pending"
    started_ms: int = 0
    finished_ms: int = 0
    shards: list[ShardStatus] = field(default_factory=list)
    degraded_reason: str = ""
    last_error: str = ""
    last_error_code: str = ""  # a grpc.StatusCode name
    durable: bool = False  # a complete copy is on shared disk
    disk_done: bool = False  # the disk tier finished (either way)
    remote_done: bool = False
    cancelled: bool = False
    must_failed: bool = False  # a ``must`` tier failed: the task ends failed

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def progress(self) -> float:
        """Bytes placed / bytes to place over every shard (a remote replica counts its bytes)."""
        if self.state == "success":
            return 1.0
        total = sum(s.total_bytes for s in self.shards)
        if not total:
            return 0.0
        done = sum(s.total_bytes if s.state == "success" else s.done_bytes for s in self.shards)
        return min(_NOT_DONE, done / total)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "key": self.key,
            "artifact_id": self.artifact_id,
            "nbytes": self.nbytes,
            "state": self.state,
            "progress": self.progress,
            "degraded_reason": self.degraded_reason,
            "last_error": self.last_error,
            "last_error_code": self.last_error_code,
            "durable": self.durable,
            "created_unix_ms": self.created_ms,
            "started_unix_ms": self.started_ms,
            "finished_unix_ms": self.finished_ms,
            "shards": [s.to_dict() for s in self.shards],
        }


class PersistenceTable:
    """Every persistence task this daemon knows. Not thread-safe: the runner holds a lock.

    Finished tasks stay queryable until ``history`` newer ones finished after them.
    """

    def __init__(self, history: int = 10_000) -> None:
        self._tasks: dict[str, PersistTask] = {}
        self._by_artifact: dict[str, str] = {}  # the newest task of each artifact
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._history = history

    # ---- lifecycle -------------------------------------------------------------------------
    def create(
        self, task_id: str, key: str, artifact_id: str, nbytes: int, plan: TaskPlan, now_ms: int
    ) -> PersistTask:
        if not plan:
            raise ValueError("a persistence task needs a disk or a remote tier")
        task = PersistTask(task_id, key, artifact_id, nbytes, plan, now_ms)
        self._tasks[task_id] = task
        self._by_artifact[artifact_id] = task_id
        return task

    def start(self, task_id: str, now_ms: int) -> PersistTask | None:
        """The task begins; None when it ended before it ran (cancelled while queued)."""
        task = self._tasks.get(task_id)
        if task is None or task.terminal:
            return None
        task.state, task.started_ms = "running", now_ms
        return task

    def disk_shard(
        self,
        task_id: str,
        index: int,
        state: str,
        done_bytes: int,
        attempt: int,
        *,
        target: str,
        total_bytes: int,
        error: str = "",
    ) -> None:
        """One event of the disk writer for shard ``index`` (its first one plans it)."""
        task = self._tasks.get(task_id)
        if task is None or task.terminal:
            return
        for shard in task.shards:
            if shard.tier == "shared_disk" and shard.index == index:
                break
        else:
            shard = ShardStatus(index, "shared_disk", target, total_bytes=total_bytes)
            disk = [s for s in task.shards if s.tier == "shared_disk"] + [shard]
            disk.sort(key=lambda s: s.index)
            task.shards = disk + [s for s in task.shards if s.tier != "shared_disk"]
        # A retry rewrites the shard from its start.
        shard.state = state
        shard.done_bytes = 0 if state == "retrying" else min(max(0, done_bytes), shard.total_bytes)
        shard.attempts = max(shard.attempts, attempt)
        if error:
            shard.error = error
        elif state == "success":
            shard.error = ""

    def finish_disk(self, task_id: str, error: tuple[str, str] | None) -> None:
        """The disk tier ended: ``error`` is (code name, message), or None on success."""
        task = self._tasks[task_id]
        if task.terminal:  # cancelled meanwhile: its outcome stands
            return
        task.disk_done = True
        if error is None:
            task.durable = True
            for shard in task.shards:
                if shard.tier == "shared_disk":
                    shard.state, shard.done_bytes = "success", shard.total_bytes
            return
        for shard in task.shards:
            if shard.tier == "shared_disk" and shard.state != "success":
                shard.state = "failed"
        self._tier_failed(task, "shared_disk", task.plan.disk or "may", error)

    def plan_remote(self, task_id: str, nodes: Iterable[str]) -> None:
        task = self._tasks[task_id]
        if task.terminal:
            return
        start = sum(1 for s in task.shards if s.tier == "stable_dram")
        for i, node in enumerate(nodes):
            task.shards.append(ShardStatus(start + i, "stable_dram", node, total_bytes=task.nbytes))

    def remote_shard(self, task_id: str, node: str, state: str, error: str = "") -> None:
        task = self._tasks[task_id]
        for shard in task.shards:
            if shard.tier == "stable_dram" and shard.target == node:
                shard.state, shard.error = state, error
                shard.attempts += 1 if state == "running" else 0
                if state == "success":
                    shard.done_bytes = shard.total_bytes

    def finish_remote(self, task_id: str, placed: int, error: tuple[str, str] | None) -> None:
        """The remote tier ended with ``placed`` copies on other nodes."""
        task = self._tasks[task_id]
        if task.terminal:
            return
        task.remote_done = True
        wanted = task.plan.remote_replicas
        if placed >= wanted and error is None:
            return
        code, message = error or ("UNAVAILABLE", "")
        reason = f"{placed} of {wanted} remote stable replica(s) placed" + (
            f": {message}" if message else ""
        )
        requirement = task.plan.remote or "may"
        self._tier_failed(task, "stable_dram (scope remote)", requirement, (code, reason))

    def cancel(self, artifact_id: str, why: str, now_ms: int) -> PersistTask | None:
        """The artifact was deleted (or its life ended) before its task finished: the task
        fails ABORTED. Returns the task if it was still going (the shell stops it)."""
        task_id = self._by_artifact.get(artifact_id)
        task = self._tasks.get(task_id) if task_id else None
        if task is None or task.terminal:
            return None
        task.cancelled = True
        task.last_error, task.last_error_code = why, "ABORTED"
        self._end(task, "failed", now_ms)
        return task

    def crashed(self, task_id: str, why: str, code: str = "INTERNAL") -> None:
        """The task could not run (a bug, or this node could not read the artifact): it
        fails with ``code`` whatever its tiers asked for."""
        task = self._tasks[task_id]
        if not task.terminal:
            task.must_failed = True
            task.last_error, task.last_error_code = why, code

    def forget(self, task_id: str) -> None:
        """Drop an ended task (it is about to run again under the same id)."""
        task = self._tasks.pop(task_id, None)
        self._finished.pop(task_id, None)
        if task is not None and self._by_artifact.get(task.artifact_id) == task_id:
            del self._by_artifact[task.artifact_id]

    def finish(self, task_id: str, now_ms: int) -> PersistTask:
        """Every tier ended: decide the outcome (a cancelled task stays failed)."""
        task = self._tasks[task_id]
        if task.terminal:
            return task
        if task.must_failed:
            state = "failed"
        elif task.degraded_reason:
            state = "degraded"
        else:
            state = "success"
        self._end(task, state, now_ms)
        return task

    # ---- queries ---------------------------------------------------------------------------
    def get(self, task_id: str) -> PersistTask | None:
        return self._tasks.get(task_id)

    def for_artifact(self, artifact_id: str) -> PersistTask | None:
        task_id = self._by_artifact.get(artifact_id)
        return self._tasks.get(task_id) if task_id else None

    def active(self) -> list[PersistTask]:
        return [t for t in self._tasks.values() if not t.terminal]

    def counts(self) -> dict[str, int]:
        """Tasks by state: the non-terminal ones, and the finished ones still remembered."""
        out = dict.fromkeys(TASK_STATES, 0)
        for task in self._tasks.values():
            out[task.state] += 1
        return out

    def running_progress(self) -> float:
        """Bytes placed / bytes to place over the running tasks (0 when none runs)."""
        running = [t for t in self._tasks.values() if t.state == "running"]
        total = sum(s.total_bytes for t in running for s in t.shards)
        if not total:
            return 0.0
        done = sum(min(s.done_bytes, s.total_bytes) for t in running for s in t.shards)
        return done / total

    # ---- internals -------------------------------------------------------------------------
    def _tier_failed(
        self, task: PersistTask, what: str, requirement: str, error: tuple[str, str]
    ) -> None:
        code, message = error
        if requirement == "must":
            task.last_error, task.last_error_code = f"{what}: {message}", code
            task.must_failed = True
        elif requirement == "should":
            reason = f"{what} failed: {message}"
            task.degraded_reason = (
                f"{task.degraded_reason}; {reason}" if task.degraded_reason else reason
            )
            if not task.last_error_code:
                task.last_error, task.last_error_code = f"{what}: {message}", code
        # "may": silent (the runner logs it)

    def _end(self, task: PersistTask, state: str, now_ms: int) -> None:
        task.state, task.finished_ms = state, now_ms
        self._finished[task.task_id] = None
        while len(self._finished) > self._history:
            old, _ = self._finished.popitem(last=False)
            gone = self._tasks.pop(old, None)
            if gone is not None and self._by_artifact.get(gone.artifact_id) == old:
                del self._by_artifact[gone.artifact_id]
