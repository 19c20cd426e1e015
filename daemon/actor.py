"""``DaemonActor``: the Ray shell around one node's daemon.  [daemon]

Created by ``tensorcast_ray.init`` or ``tensorcast-ray daemon start`` as ``daemon:<node_id>``:
detached, pinned to its node with hard node affinity, ``max_restarts=-1``, ``num_cpus=0``.
Ray's handle is for lifecycle and discovery only (``info``, ``status``, ``stop``); requests
go to the gRPC server or the local socket it starts. A restart re-adopts the node's shared
memory from the journal and takes its old gRPC port back.

Before it touches its shared memory, a daemon claims its prefix (writes its owner file under
the claim lock) and starts its guardian (tensorcast_ray._guardian), which frees that memory
once the daemon is gone and Ray does not restart it. A restarted daemon whose guardian already
freed everything starts empty.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from typing import Any

import ray
from tensorcast_ray.daemon.local_store import LocalStore
from tensorcast_ray.daemon.metrics import DaemonMetrics
from tensorcast_ray.daemon.remote import ClusterTier
from tensorcast_ray.daemon.server import DaemonServer, private_socket_dir
from tensorcast_ray.daemon.service import DaemonIdentity, DaemonService

from tensorcast_ray._actors import GLOBAL_STORE_NAME, get_actor, message_to_dict
from tensorcast_ray._auth import (
    default_socket_dir,
    namespace_token,
    remove_token_file,
    token_file,
    unauthenticated_error,
    write_token_file,
)
from tensorcast_ray._config import DaemonConfig
from tensorcast_ray._errors import FailedPreconditionError
from tensorcast_ray._gc import claim_lock, collect, read_owner, write_owner
from tensorcast_ray._guardian import spawn as spawn_guardian
from tensorcast_ray._local_channel import METHODS
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2
from tensorcast_ray._shm import segment_prefix
from tensorcast_ray._version import __version__

logger = logging.getLogger("tensorcast_ray.daemon")


class DaemonActor:
    def __init__(
        self,
        config: dict[str, Any],
        namespace: str,
        global_store_mode: str = "none",
        global_store_address: str | None = None,
        show_logs: bool = False,
        version_override: str | None = None,
    ) -> None:
        self.config = DaemonConfig.model_validate(config)
        logging.basicConfig(level=self.config.log_level if show_logs else "WARNING")
        self.node_id = ray.get_runtime_context().get_node_id()
        self.namespace = namespace
        self.prefix = segment_prefix(namespace, self.node_id)
        self.global_store_mode = global_store_mode
        self._gs_address = global_store_address or ""
        self._gs_version = ""
        self._gs_handle: Any = None
        metrics = DaemonMetrics(
            version=version_override or __version__,
            node_id=self.node_id,
            tiers=["stable_dram"],
            rpc_methods=[*METHODS, "Session"],
        )
        socket_dir = private_socket_dir(self.config.socket_dir or default_socket_dir())
        owner = {
            "node_id": self.node_id,
            "namespace": namespace,
            "started_unix": time.time(),
        }
        with claim_lock(socket_dir):  # the guardian of a previous instance reaps under it
            port = (read_owner(self.config.shm_dir, self.prefix) or {}).get("port")
            write_owner(self.config.shm_dir, self.prefix, port=port, **owner)
        self.guardian_pid = spawn_guardian(
            self.config.shm_dir, self.prefix, socket_dir, self.config.guardian_grace_s
        )
        self.store = LocalStore(self.config, prefix=self.prefix, metrics=metrics)
        identity = DaemonIdentity(self.node_id, namespace, version=version_override or __version__)
        self.service = DaemonService(identity, self.store, metrics, self._global_store_info)
        socket_path = None
        if self.config.local_socket:
            socket_path = os.path.join(socket_dir, f"{self.prefix}sock")
        token = namespace_token(namespace)
        self._token = token
        self.cluster: ClusterTier | None = None
        self.server = DaemonServer(self.service, self.config, socket_path, token)
        self.server.start(preferred_port=port if isinstance(port, int) else None)
        write_owner(self.config.shm_dir, self.prefix, port=self.server.port, **owner)
        # For this user's processes outside Ray (init(mode="connect", address=...)).
        self._token_file = token_file(socket_dir, self.prefix)
        write_token_file(self._token_file, token, self.server.port, self.server.tls_cert.decode())
        self._collect_stale()
        self._connect_global_store()
        self.store.resume_persistence()
        logger.info("daemon %s serving at %s", self.node_id, self.service.address)

    def _collect_stale(self) -> None:
        """Free shared memory of daemons on this host that died for good (see _gc)."""
        try:
            removed = collect(
                self.config.shm_dir,
                min_age_s=self.config.stale_shm_grace_s,
                exclude=self.prefix,
                socket_dir=self.config.socket_dir or default_socket_dir(),
            )
        except OSError:
            logger.exception("collecting stale shared memory failed")
            return
        for stale in removed:
            logger.warning(
                "removed %d files (%d bytes) of dead daemon %s (pid %s)",
                len(stale.files),
                stale.nbytes,
                stale.prefix,
                stale.owner_pid,
            )

    def _connect_global_store(self) -> None:
        """Join the cluster tier: the Global Store's catalog, pulls from other nodes."""
        if self.global_store_mode == "none":
            return
        handle = get_actor(GLOBAL_STORE_NAME, self.namespace)
        if handle is None:
            logger.warning("Global Store not found in namespace %s", self.namespace)
            return
        self._gs_handle = handle
        self.cluster = ClusterTier(
            self.store,
            namespace=self.namespace,
            node_id=self.node_id,
            gs_handle=handle,
            token=self._token,
            config=self.config,
            metrics=self.store.metrics,
            record=self._record,
        )
        # First: from here a write on this node is a cluster write (refused while the Global
        # Store cannot be reached), never a local-only one the catalog would not know.
        self.store.cluster = self.cluster
        try:
            self.cluster.start()
        except Exception:
            # Serving local reads needs no Global Store; the heartbeat syncs once it answers.
            logger.exception("could not report to the Global Store; will retry")
            self.cluster.start_heartbeat()

    def _record(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "address": self.service.address,
            "version": self.service.identity.version,
            "instance_id": self.service.identity.instance_id,
        }

    def _global_store_info(self) -> tuple[str, str]:
        if self.cluster is not None and self.cluster.gs_address:
            return self.cluster.gs_address, self.cluster.gs_version
        return self._gs_address, self._gs_version

    def _check(self, token: str) -> ClusterTier:
        """Daemon-to-daemon and Global Store-to-daemon calls carry the namespace token."""
        if not isinstance(token, str) or not hmac.compare_digest(token, self._token):
            raise unauthenticated_error()
        if self.cluster is None:
            raise FailedPreconditionError(
                f"the daemon of node {self.node_id[:12]} is not part of a cluster (it runs "
                "without a Global Store)"
            )
        return self.cluster

    # ---- called by other daemons and the Global Store (authenticated) -----------------------
    @ray.method(concurrency_group="transfer")
    def transfer_open(self, token: str, artifact_id: str, wait_s: float) -> dict[str, Any]:
        return self._check(token).open_transfer(artifact_id, wait_s)

    @ray.method(concurrency_group="transfer")
    def transfer_shard(
        self, token: str, transfer_id: str, shard: int, pieces: list[Any], timeout_s: float
    ) -> list[Any]:
        # In a list: the caller gets the ref (owned here), not the value.
        return [self._check(token).source.serve(transfer_id, shard, pieces, timeout_s)]

    @ray.method(concurrency_group="transfer")
    def transfer_close(self, token: str, transfer_id: str) -> None:
        self._check(token).source.close(transfer_id)

    @ray.method(concurrency_group="transfer")
    def describe_artifact(self, token: str, artifact_id: str) -> dict[str, Any] | None:
        self._check(token)
        return self.store.transfer_meta(artifact_id)

    @ray.method(concurrency_group="transfer")
    def pull_replica(
        self,
        token: str,
        entry: dict[str, Any],
        upstream: str,
        transport: str,
        source: str,
        fallback: bool = False,
        onward: bool = True,
    ) -> dict[str, Any]:
        return self._check(token).pull_replica(entry, upstream, transport, source, fallback, onward)

    @ray.method(concurrency_group="transfer")
    def collective_serve(self, token: str, request: dict[str, Any]) -> dict[str, Any]:
        from tensorcast_ray._transport import collective

        return collective.serve(self._check(token), request)

    @ray.method(concurrency_group="control")
    def copy_info(self, token: str, artifact_id: str) -> dict[str, Any] | None:
        """This node's copy of ``artifact_id`` (for ``tensorcast-ray inspect``), or None."""
        self._check(token)
        art = self.store.local_artifact(artifact_id)
        if art is None:
            return None
        return {
            "node_id": self.node_id,
            "tier": "stable_dram",
            "replica_kind": art.replica_kind,
            "served_by": art.served_by,
            "requirement": art.requirement,
            "retention": art.retention,
            "nbytes": art.nbytes,
        }

    @ray.method(concurrency_group="control")
    def keep(self, token: str, artifact_id: str) -> bool:
        self._check(token)
        return self.store.keep(artifact_id)

    @ray.method(concurrency_group="control")
    def drop_artifacts(self, token: str, artifact_ids: list[str]) -> int:
        self._check(token)
        return self.store.drop_artifacts(artifact_ids, reason="dropped by the cluster")

    @ray.method(concurrency_group="transfer")
    def persistence_status(
        self, token: str, task_id: str, wait_s: float = 0.0
    ) -> dict[str, Any] | None:
        """A persistence task this daemon runs (another node's daemon asks for its reader)."""
        self._check(token)
        return self.store.persistence.status(task_id=task_id, wait_s=wait_s)

    @ray.method(concurrency_group="control")
    def resync(self, token: str, gs_instance: str) -> None:
        """A (re)started Global Store asks for this node's full report."""
        self._check(token).sync()

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "namespace": self.namespace,
            "address": self.service.address,
            "metrics_address": self.service.metrics_address,
            "local_socket": self.service.local_socket,
            "version": self.service.identity.version,
            "instance_id": self.service.identity.instance_id,
            "pid": os.getpid(),
            "guardian_pid": self.guardian_pid,
            "global_store_address": self._gs_address,
            "global_store_version": self._gs_version,
            "shm_dir": self.config.shm_dir,
            "segment_prefix": self.prefix,
            "config_fingerprint": self.config.fingerprint(),
            "tls_cert_pem": self.server.tls_cert.decode(),
        }

    @ray.method(concurrency_group="control")
    def status(self) -> dict[str, Any]:
        response = self.service.rpc_Status(daemon_pb2.StatusRequest(), "")
        return message_to_dict(response)

    @ray.method(concurrency_group="control")
    def stop(self) -> None:
        """A clean stop: finish (up to persist_drain_s) the persistence tasks in flight,
        close endpoints and free every segment of this node's daemon."""
        self.store.persistence.close(self.config.persist_drain_s)
        if self.cluster is not None:
            self.cluster.leave()
            self.cluster.stop()
        self.server.stop()
        remove_token_file(self._token_file)
        self.store.close(unlink=True)  # segments, validity table, journal and owner file
