"""The daemon's journal: an append-only log of its index, next to its segments.  [daemon]

Why: a restarted daemon (``max_restarts=-1``) re-adopts the node's shared memory instead of
losing every artifact. Each event is one JSON line appended at commit, delete, buffer
allocation and release, so the cost of a commit does not grow with the store (rewriting
the whole index on each commit did: 11 → 35 ms after five 282-tensor artifacts).
The background tick compacts the log (rewrite + atomic rename) once dead lines dominate.

Events: ``{"op": "artifact", "data": {...}}``, ``{"op": "drop", "id": ...}``,
``{"op": "buffer", "data": {...}}``, ``{"op": "unbuffer", "id": ...}``. A torn last line
(a crash mid-write) ends the replay there; everything before it is kept.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2


@dataclass
class Replayed:
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    buffers: dict[str, dict[str, Any]] = field(default_factory=dict)


class Journal:
    """[daemon] Not thread-safe: the store's lock serializes calls."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines = 0
        self._file: Any = None

    def _open(self) -> Any:
        if self._file is None:
            fd = os.open(self.path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
            if self._file.tell() == 0:
                self._file.write(json.dumps({"op": "header", "version": FORMAT_VERSION}) + "\n")
        return self._file

    def _append(self, event: dict[str, Any]) -> None:
        f = self._open()
        f.write(json.dumps(event, separators=(",", ":")) + "\n")
        f.flush()  # survive a killed process (the file lives in tmpfs, like the segments)
        self.lines += 1

    def add_artifact(self, data: dict[str, Any]) -> None:
        self._append({"op": "artifact", "data": data})

    def drop_artifact(self, artifact_id: str) -> None:
        self._append({"op": "drop", "id": artifact_id})

    def add_buffer(self, data: dict[str, Any]) -> None:
        self._append({"op": "buffer", "data": data})

    def drop_buffer(self, buffer_id: str) -> None:
        self._append({"op": "unbuffer", "id": buffer_id})

    def replay(self) -> Replayed | None:
        """The state the log describes, or None when there is no journal."""
        try:
            f = open(self.path, encoding="utf-8")
        except FileNotFoundError:
            return None
        state = Replayed()
        with f:
            for number, line in enumerate(f, 1):
                try:
                    event = json.loads(line)
                    op = event["op"]
                    if op == "artifact":
                        state.artifacts[event["data"]["artifact_id"]] = event["data"]
                    elif op == "drop":
                        state.artifacts.pop(event["id"], None)
                    elif op == "buffer":
                        state.buffers[event["data"]["buffer_id"]] = event["data"]
                    elif op == "unbuffer":
                        state.buffers.pop(event["id"], None)
                    elif op == "header" and event.get("version") != FORMAT_VERSION:
                        logger.warning("journal %s has format %s; ignoring it", self.path, event)
                        return Replayed()
                except (ValueError, KeyError, TypeError):
                    logger.warning(
                        "journal %s: line %d is torn; replay stops there", self.path, number
                    )
                    break
                self.lines = number
        return state

    def needs_compaction(self, live: int) -> bool:
        return self.lines > 2 * live + 256

    def compact(self, artifacts: list[dict[str, Any]], buffers: list[dict[str, Any]]) -> None:
        """Rewrite the log as one event per live record (temp file + atomic rename)."""
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps({"op": "header", "version": FORMAT_VERSION}) + "\n")
            for data in artifacts:
                f.write(json.dumps({"op": "artifact", "data": data}, separators=(",", ":")) + "\n")
            for data in buffers:
                f.write(json.dumps({"op": "buffer", "data": data}, separators=(",", ":")) + "\n")
        self.close()
        os.replace(tmp, self.path)
        self.lines = 1 + len(artifacts) + len(buffers)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        for path in (self.path, self.path + ".tmp"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
