"""``GlobalStoreActor``: the cluster's metadata service as a Ray actor.  [Global Store]

One named (``global_store``), detached, restartable actor per namespace. It holds metadata
only — which daemons exist and, as the cross-node issues land, keys → versions → replicas —
and never bytes. It serves gRPC (Health, Status) for processes outside Ray and the CLI, a
Prometheus ``/metrics`` endpoint, and Ray actor methods for daemons.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from typing import Any

import ray
from google.protobuf.message import Message
from tensorcast_ray.global_store.metrics import GlobalStoreMetrics

from tensorcast_ray._actors import message_to_dict
from tensorcast_ray._auth import namespace_token
from tensorcast_ray._catalog import Catalog
from tensorcast_ray._config import DEFAULT_GLOBAL_STORE_METRICS_PORT, GlobalStoreConfig
from tensorcast_ray._errors import InvalidArgumentError
from tensorcast_ray._grpc_server import (
    AioServerThread,
    bind_error,
    bind_preferring,
    unary_handlers,
)
from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2, global_store_pb2
from tensorcast_ray._version import PROTOCOL_VERSION, __version__

logger = logging.getLogger("tensorcast_ray.global_store")

SERVICE_NAME = "tensorcast_ray.v1.GlobalStore"
_METHODS: dict[str, tuple[int, type[Message], type[Message]]] = {
    "Health": (0, common_pb2.HealthRequest, common_pb2.HealthResponse),
    "Status": (1, global_store_pb2.GlobalStatusRequest, global_store_pb2.GlobalStatusResponse),
}


class GlobalStoreActor:
    def __init__(
        self, config: dict[str, Any], namespace: str, version_override: str | None = None
    ) -> None:
        self.config = GlobalStoreConfig.model_validate(config)
        self.namespace = namespace
        self.version = version_override or __version__
        self.catalog = Catalog()
        self._daemons: dict[str, global_store_pb2.DaemonRecord] = {}
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.metrics = GlobalStoreMetrics(version=self.version, rpc_methods=list(_METHODS))
        self._executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="tc-gs-rpc")
        self._aio = AioServerThread("tc-gs-grpc")
        handler = unary_handlers(SERVICE_NAME, _METHODS, self._dispatch, self._executor)
        self.port = self._aio.start(
            [handler], self.config.listen_host, self.config.listen_port, namespace_token(namespace)
        )
        host, port = self.config.metrics_host, self.config.metrics_port
        try:
            if port is None:  # the default: another namespace or Ray cluster may hold it
                self.metrics_port = bind_preferring(
                    lambda p: self.metrics.serve(p, host),
                    DEFAULT_GLOBAL_STORE_METRICS_PORT,
                    "Global Store metrics endpoint",
                )
            else:
                self.metrics_port = self.metrics.serve(port, host)
        except OSError as exc:
            self._aio.stop()
            raise bind_error("Global Store metrics endpoint", host, port or 0, exc) from exc
        self.address = f"{self.config.listen_host}:{self.port}"
        self.metrics_address = f"{self.config.metrics_host}:{self.metrics_port}"

    def _dispatch(self, method: str, request: Any) -> Any:
        with self.metrics.observe_rpc(method):
            if method == "Health":
                return common_pb2.HealthResponse(
                    ok=True,
                    version=self.version,
                    protocol=PROTOCOL_VERSION,
                    uptime_s=time.monotonic() - self._started,
                )
            return self._status_pb()

    def _status_pb(self) -> global_store_pb2.GlobalStatusResponse:
        with self._lock:
            daemons = list(self._daemons.values())
        return global_store_pb2.GlobalStatusResponse(
            version=self.version,
            address=self.address,
            metrics_address=self.metrics_address,
            uptime_s=time.monotonic() - self._started,
            keys=self.catalog.names(),
            artifacts=len(self.catalog),
            daemons=daemons,
            namespace=self.namespace,
            pid=os.getpid(),
        )

    @ray.method(concurrency_group="control")
    def register_daemon(self, record: dict[str, Any]) -> dict[str, Any]:
        node_id = record.get("node_id")
        if not isinstance(node_id, str) or not node_id:
            raise InvalidArgumentError("register_daemon needs a node_id")
        with self._lock:
            self._daemons[node_id] = global_store_pb2.DaemonRecord(
                node_id=node_id,
                address=str(record.get("address", "")),
                version=str(record.get("version", "")),
                instance_id=str(record.get("instance_id", "")),
                last_seen_unix_s=time.time(),
            )
            self.metrics.daemons_known.set(len(self._daemons))
        return {"address": self.address, "version": self.version}

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "metrics_address": self.metrics_address,
            "version": self.version,
            "namespace": self.namespace,
            "pid": os.getpid(),
        }

    @ray.method(concurrency_group="control")
    def status(self) -> dict[str, Any]:
        return message_to_dict(self._status_pb())

    @ray.method(concurrency_group="control")
    def stop(self) -> None:
        self._aio.stop()
        self.metrics.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
