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

import logging
import os
import time
from typing import Any

import ray
from tensorcast_ray.daemon.local_store import LocalStore
from tensorcast_ray.daemon.metrics import DaemonMetrics
from tensorcast_ray.daemon.server import DaemonServer, private_socket_dir
from tensorcast_ray.daemon.service import DaemonIdentity, DaemonService

from tensorcast_ray._actors import GLOBAL_STORE_NAME, get_actor, message_to_dict
from tensorcast_ray._auth import (
    default_socket_dir,
    namespace_token,
    remove_token_file,
    token_file,
    write_token_file,
)
from tensorcast_ray._config import DaemonConfig
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
        self.server = DaemonServer(self.service, self.config, socket_path, token)
        self.server.start(preferred_port=port if isinstance(port, int) else None)
        write_owner(self.config.shm_dir, self.prefix, port=self.server.port, **owner)
        # For this user's processes outside Ray (init(mode="connect", address=...)).
        self._token_file = token_file(socket_dir, self.prefix)
        write_token_file(self._token_file, token, self.server.port, self.server.tls_cert.decode())
        self._collect_stale()
        self._connect_global_store()
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
        if self.global_store_mode == "none":
            return
        handle = get_actor(GLOBAL_STORE_NAME, self.namespace)
        if handle is None:
            logger.warning("Global Store not found in namespace %s", self.namespace)
            return
        self._gs_handle = handle
        try:
            info = ray.get(
                handle.register_daemon.remote(
                    {
                        "node_id": self.node_id,
                        "address": self.service.address,
                        "version": self.service.identity.version,
                        "instance_id": self.service.identity.instance_id,
                    }
                ),
                timeout=self.config.global_store_timeout_s,
            )
            self._gs_address = info["address"]
            self._gs_version = info["version"]
        except Exception:
            logger.exception("could not register with the Global Store")

    def _global_store_info(self) -> tuple[str, str]:
        return self._gs_address, self._gs_version

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
        """A clean stop: close endpoints and free every segment of this node's daemon."""
        self.server.stop()
        remove_token_file(self._token_file)
        self.store.close(unlink=True)  # segments, validity table, journal and owner file
