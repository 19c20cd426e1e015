"""Configuration: the daemon and Global Store YAML files, ports, and the environment.  [SDK]

Resolution for ``init(mode="create"|"auto")`` and ``tensorcast-ray ... start``:
the ``*_config_path`` parameter > ``TENSORCAST_RAY_DAEMON_CONFIG`` (resp.
``TENSORCAST_RAY_GLOBAL_STORE_CONFIG``) > the packaged defaults (``examples/config/*.yaml``,
installed as ``tensorcast_ray.default_config``).
A missing or invalid file fails with INVALID_ARGUMENT naming the file and the field.

The environment is read in exactly one place, :func:`from_env`, never at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator

from tensorcast_ray._errors import InvalidArgumentError

__all__ = [
    "DEFAULT_GLOBAL_STORE_METRICS_PORT",
    "DaemonConfig",
    "EnvSettings",
    "GlobalStoreConfig",
    "PortConfig",
    "from_env",
    "load_daemon_config",
    "load_global_store_config",
]

Port = Annotated[int, Field(ge=0, le=65535)]
#: The Global Store's /metrics port when its config names none (a busy one is not an error).
DEFAULT_GLOBAL_STORE_METRICS_PORT = 18008


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaemonConfig(_Strict):
    """``store_daemon_config.yaml``: one node daemon. See docs/configuration.md."""

    def fingerprint(self) -> str:
        """A short hash of every field, to tell whether two processes ask for the same daemon."""
        import hashlib
        import json

        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    listen_host: str = "127.0.0.1"
    listen_port: Port = 0
    metrics_host: str = "127.0.0.1"
    metrics_port: Port = 0
    local_socket: bool = True
    socket_dir: str | None = None
    shm_dir: str = "/dev/shm"
    stable_dram_capacity_bytes: ByteSize = ByteSize(8 << 30)
    shm_segment_bytes: ByteSize = ByteSize(64 << 20)
    shm_pool_bytes: ByteSize = ByteSize(512 << 20)
    client_staging_bytes: ByteSize = ByteSize(256 << 20)
    epoch_slots: Annotated[int, Field(ge=1024, le=1 << 24)] = 65536
    journal: bool = True
    stale_shm_grace_s: Annotated[float, Field(ge=0)] = 600.0
    guardian_grace_s: Annotated[float, Field(ge=0)] = 20.0
    global_store_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    write_timeout_s: Annotated[float, Field(gt=0)] = 3600.0
    # The cluster tier (docs/cluster.md): pulls between nodes and liveness reports.
    transfer_shard_bytes: Annotated[ByteSize, Field(ge=1 << 20)] = ByteSize(64 << 20)
    transfer_parallel: Annotated[int, Field(ge=1, le=64)] = 4
    transfer_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    # How a read pulls another node's copy: Ray's object store (the default), or the gloo
    # pair groups replicate uses (no object-store copies; falls back to the object store).
    read_transport: Literal["object_store", "collective"] = "object_store"
    heartbeat_s: Annotated[float, Field(gt=0)] = 2.0
    # PEM files: with both, the gRPC server speaks TLS (for a bind beyond loopback).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Persistence (docs/persistence.md): the shared-disk root every daemon of a cluster uses
    # (a fsspec URL; TENSORCAST_RAY_PERSIST_URL overrides it) and how its tasks run.
    persist_url: str | None = None
    persist_storage_options: dict[str, Any] = Field(default_factory=dict)
    persist_tasks: Annotated[int, Field(ge=1, le=64)] = 2
    persist_parallel: Annotated[int, Field(ge=1, le=64)] = 4
    persist_buffer_bytes: Annotated[ByteSize, Field(ge=1 << 20)] = ByteSize(64 << 20)
    persist_attempts: Annotated[int, Field(ge=1, le=100)] = 8
    persist_retry_min_s: Annotated[float, Field(gt=0)] = 0.5
    persist_retry_max_s: Annotated[float, Field(gt=0)] = 15.0
    persist_timeout_s: Annotated[float, Field(gt=0)] = 3600.0
    persist_drain_s: Annotated[float, Field(ge=0)] = 30.0
    persist_on_delete: Literal["remove", "retain"] = "remove"
    persist_task_history: Annotated[int, Field(ge=1)] = 10_000

    @model_validator(mode="after")
    def _tls_pair(self) -> DaemonConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        return self


class GlobalStoreConfig(_Strict):
    """``global_store_config.yaml``: the cluster's Global Store. See docs/configuration.md."""

    listen_host: str = "127.0.0.1"
    listen_port: Port = 0
    metrics_host: str = "127.0.0.1"
    #: None: :data:`DEFAULT_GLOBAL_STORE_METRICS_PORT`, or any free port when that is taken.
    metrics_port: Port | None = None
    #: fsspec URL of the journal of durable artifacts (None: kept in memory only);
    #: ``TENSORCAST_RAY_JOURNAL_URL`` overrides it where ``tc.init`` (or the CLI) starts it.
    journal_url: str | None = None
    #: fsspec ``storage_options`` for ``journal_url`` (e.g. an S3 endpoint and credentials)
    journal_storage_options: dict[str, Any] = Field(default_factory=dict)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


@dataclass(frozen=True)
class PortConfig:
    """Port overrides for processes ``init`` starts. ``0`` picks a free port; ``None`` keeps
    the YAML value. Ignored in ``connect`` mode (nothing is started)."""

    daemon_listen_port: int | None = None
    daemon_metrics_port: int | None = None
    global_store_listen_port: int | None = None
    global_store_metrics_port: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "daemon_listen_port",
            "daemon_metrics_port",
            "global_store_listen_port",
            "global_store_metrics_port",
        ):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535
            ):
                raise InvalidArgumentError(
                    f"PortConfig.{name}={value!r}: a port is an int in 0..65535 (0 = any free port)"
                )

    def apply_daemon(self, config: DaemonConfig) -> DaemonConfig:
        update = {
            "listen_port": self.daemon_listen_port,
            "metrics_port": self.daemon_metrics_port,
        }
        return config.model_copy(update={k: v for k, v in update.items() if v is not None})

    def apply_global_store(self, config: GlobalStoreConfig) -> GlobalStoreConfig:
        update = {
            "listen_port": self.global_store_listen_port,
            "metrics_port": self.global_store_metrics_port,
        }
        return config.model_copy(update={k: v for k, v in update.items() if v is not None})


@dataclass(frozen=True)
class EnvSettings:
    """Everything tensorcast_ray reads from the environment."""

    daemon_config_path: str | None = None
    global_store_config_path: str | None = None
    namespace: str | None = None
    ray_address: str | None = None
    token: str | None = None  # the namespace token, for clients that cannot get it from Ray
    tls_ca_file: str | None = None  # PEM the SDK trusts for a TLS daemon, instead of its own
    persist_url: str | None = None  # overrides DaemonConfig.persist_url (for operators)
    journal_url: str | None = None  # overrides GlobalStoreConfig.journal_url

    def with_overrides(self, **kwargs: Any) -> EnvSettings:
        return replace(self, **{k: v for k, v in kwargs.items() if v is not None})


def from_env(environ: dict[str, str] | None = None) -> EnvSettings:
    env = os.environ if environ is None else environ
    return EnvSettings(
        daemon_config_path=env.get("TENSORCAST_RAY_DAEMON_CONFIG") or None,
        global_store_config_path=env.get("TENSORCAST_RAY_GLOBAL_STORE_CONFIG") or None,
        namespace=env.get("TENSORCAST_RAY_NAMESPACE") or None,
        ray_address=env.get("RAY_ADDRESS") or None,
        token=env.get("TENSORCAST_RAY_TOKEN") or None,
        tls_ca_file=env.get("TENSORCAST_RAY_TLS_CA") or None,
        persist_url=env.get("TENSORCAST_RAY_PERSIST_URL") or None,
        journal_url=env.get("TENSORCAST_RAY_JOURNAL_URL") or None,
    )


_M = TypeVar("_M", bound=_Strict)


def _load(model: type[_M], path: str | None, env_path: str | None, default_name: str) -> _M:
    if path is not None:
        source, text = str(path), _read(str(path), "the config path passed in")
    elif env_path is not None:
        source, text = env_path, _read(env_path, "$" + _ENV_NAME[model])
    else:
        resource = resources.files("tensorcast_ray.default_config").joinpath(default_name)
        source, text = f"<packaged {default_name}>", resource.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgumentError(f"config file {source} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidArgumentError(
            f"config file {source} must hold a mapping of fields, not {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"field {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidArgumentError(
            f"config file {source} is invalid: {problems}. "
            f"See docs/configuration.md for every field."
        ) from exc


_ENV_NAME = {
    DaemonConfig: "TENSORCAST_RAY_DAEMON_CONFIG",
    GlobalStoreConfig: "TENSORCAST_RAY_GLOBAL_STORE_CONFIG",
}


def _read(path: str, where: str) -> str:
    file = Path(path).expanduser()
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError(
            f"config file {path} (from {where}) does not exist; pass an existing YAML file "
            "or leave it unset to use the packaged defaults"
        ) from None
    except OSError as exc:
        raise InvalidArgumentError(
            f"config file {path} (from {where}) cannot be read: {exc}"
        ) from exc


def load_daemon_config(path: str | None = None, env: EnvSettings | None = None) -> DaemonConfig:
    env = env or from_env()
    config = _load(DaemonConfig, path, env.daemon_config_path, "store_daemon_config.yaml")
    if env.persist_url:
        config = config.model_copy(update={"persist_url": env.persist_url})
    return config


def load_global_store_config(
    path: str | None = None, env: EnvSettings | None = None
) -> GlobalStoreConfig:
    env = env or from_env()
    config = _load(
        GlobalStoreConfig, path, env.global_store_config_path, "global_store_config.yaml"
    )
    if env.journal_url:
        config = config.model_copy(update={"journal_url": env.journal_url})
    return config
