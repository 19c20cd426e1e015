"""``tensorcast_ray.init`` and ``shutdown``: find or start the node's daemon.  [SDK]

Modes:

- ``auto``: find this node's daemon actor, creating it if missing (detached, hard node
  affinity, ``max_restarts=-1``, ``num_cpus=0``, ``get_if_exists=True``), so any number of
  processes calling ``init()`` at once converge on one daemon per node — and, with
  ``global_store_mode=None``, on one Global Store per cluster.
- ``connect``: only attach — to ``address`` over gRPC from any process, Ray or not, or to
  this node's daemon actor. Nothing reachable → UNAVAILABLE saying how to start one.
- ``create``: start a daemon owned by this job (gone with the job or at ``shutdown()``);
  one already running here → FAILED_PRECONDITION.

One daemon endpoint per process: a second ``init`` for another address fails; ``init``
in a forked child starts afresh and never touches the parent's connection.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from tensorcast_ray import _actors
from tensorcast_ray._client import DaemonClient, versions_compatible
from tensorcast_ray._config import (
    DaemonConfig,
    EnvSettings,
    PortConfig,
    from_env,
    load_daemon_config,
    load_global_store_config,
)
from tensorcast_ray._errors import (
    ArtifactError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from tensorcast_ray._version import __version__

logger = logging.getLogger(__name__)

MODES = ("auto", "connect", "create")
GLOBAL_STORE_MODES = (None, "none", "connect", "start")


@dataclass(frozen=True)
class Versions:
    sdk: str
    daemon: str
    global_store: str | None


@dataclass(frozen=True)
class InitContext:
    """What ``init`` connected to."""

    node_id: str
    namespace: str
    mode: str
    daemon_address: str
    global_store_address: str | None
    versions: Versions
    transport: str
    metrics_address: str | None = None


@dataclass
class _State:
    pid: int
    ctx: InitContext
    client: DaemonClient
    started_ray: bool = False  # this process called ray.init (and so ray.shutdown)
    started_cluster: bool = False  # ... and that started a new cluster, not joined one
    owned_daemon: Any = None
    owned_global_store: Any = None
    stager: Any = None  # tensorcast_ray._staging.Stager, started at the first put


_lock = threading.Lock()
_state: _State | None = None


def current() -> _State:
    """The initialized state of this process, or FAILED_PRECONDITION."""
    state = _state
    if state is None or state.pid != os.getpid():
        raise FailedPreconditionError(
            "tensorcast_ray is not initialized in this process; call tensorcast_ray.init() first"
        )
    return state


def is_initialized() -> bool:
    return _state is not None and _state.pid == os.getpid()


def init(
    mode: str = "auto",
    address: str | None = None,
    *,
    namespace: str | None = None,
    ray_address: str | None = None,
    daemon_config_path: str | None = None,
    global_store_mode: str | None = None,
    global_store_address: str | None = None,
    global_store_config_path: str | None = None,
    port_config: PortConfig | None = None,
    show_daemon_logs: bool = False,
    metrics_port: int | None = None,
) -> InitContext:
    """Connect this process to its node's tensorcast daemon. See docs/startup-modes.md."""
    global _state
    if mode not in MODES:
        raise InvalidArgumentError(f"mode={mode!r}; expected one of {', '.join(MODES)}")
    if global_store_mode not in GLOBAL_STORE_MODES:
        raise InvalidArgumentError(
            f"global_store_mode={global_store_mode!r}; expected None, 'none', 'connect' or 'start'"
        )
    if address is not None and mode != "connect":
        raise InvalidArgumentError(
            f"address={address!r} is only used with mode='connect'; with mode={mode!r} the "
            "daemon of this Ray node is found (or started) through Ray"
        )
    if port_config is not None and not isinstance(port_config, PortConfig):
        raise InvalidArgumentError("port_config must be a tensorcast_ray.PortConfig")
    env = from_env()
    namespace = namespace or env.namespace or _actors.DEFAULT_NAMESPACE
    with _lock:
        if _state is not None and _state.pid != os.getpid():
            _state.client.close()  # a forked child: forget the parent's connection
            _state = None
        if _state is not None:
            same = address is None or address == _state.ctx.daemon_address
            if same and namespace == _state.ctx.namespace:
                return _state.ctx
            raise FailedPreconditionError(
                f"client already initialized for address {_state.ctx.daemon_address} "
                f"(namespace {_state.ctx.namespace!r}); refusing a second client for "
                f"{address or namespace!r}: use one daemon endpoint per process, or call "
                "tensorcast_ray.shutdown() first"
            )
        if mode == "connect" and address is not None:
            state = _connect_address(address, namespace, env)
        else:
            state = _init_with_ray(
                mode,
                namespace,
                env.with_overrides(ray_address=ray_address),
                daemon_config_path,
                global_store_mode,
                global_store_address,
                global_store_config_path,
                port_config or PortConfig(),
                show_daemon_logs,
            )
        if metrics_port is not None:
            from tensorcast_ray._metrics import get_sdk_metrics

            try:
                bound = get_sdk_metrics().serve(metrics_port)
            except BaseException as exc:
                _release(state)  # a busy port must not leave a connection or daemon behind
                if isinstance(exc, OSError):
                    raise FailedPreconditionError(
                        f"cannot serve SDK metrics on 127.0.0.1:{metrics_port}: {exc}; pick "
                        "another metrics_port, or 0 for any free one"
                    ) from exc
                raise
            state.ctx = _replace_ctx(state.ctx, metrics_address=f"127.0.0.1:{bound}")
        _state = state
        _register_at_exit()
        logger.info("tensorcast_ray initialized: %s", state.ctx)
        return state.ctx


def _replace_ctx(ctx: InitContext, **kwargs: Any) -> InitContext:
    from dataclasses import replace

    return replace(ctx, **kwargs)


def _context(client: DaemonClient, mode: str, namespace: str) -> InitContext:
    hello = client.hello
    assert hello is not None
    return InitContext(
        node_id=hello.node_id,
        namespace=hello.namespace or namespace,
        mode=mode,
        daemon_address=client.address,
        global_store_address=hello.global_store_address or None,
        versions=Versions(
            sdk=__version__,
            daemon=hello.versions.daemon,
            global_store=hello.versions.global_store or None,
        ),
        transport=client.transport,
    )


def _connect_address(address: str, namespace: str, env: EnvSettings) -> _State:
    from tensorcast_ray._auth import tls_cert_for_address, token_for_address

    certs = _read_ca(env.tls_ca_file) if env.tls_ca_file else tls_cert_for_address(address)
    try:
        client = DaemonClient(
            address, token=env.token or token_for_address(address), root_certificates=certs
        )
    except UnavailableError as exc:
        raise UnavailableError(
            f"no tensorcast daemon answers at {address}: {exc.message}. Start one with "
            "`tensorcast-ray daemon start` (inside the Ray cluster) or tensorcast_ray.init("
            "mode='auto') in a Ray job, then pass its address (see `tensorcast-ray daemon status`)"
        ) from exc
    return _State(os.getpid(), _context(client, "connect", namespace), client)


def _read_ca(path: str) -> bytes:
    try:
        with open(os.path.expanduser(path), "rb") as f:
            return f.read()
    except OSError as exc:
        raise InvalidArgumentError(
            f"$TENSORCAST_RAY_TLS_CA={path!r} cannot be read: {exc}; give the PEM certificate "
            "(or CA) of the daemon's TLS server, or unset it"
        ) from exc


def _ensure_ray(env: EnvSettings) -> bool:
    """Join or start Ray when the caller has not; True if it called ``ray.init``."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=env.ray_address, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UnavailableError(
            f"tensorcast_ray.init could not start or join Ray (address "
            f"{env.ray_address or 'local'}): {exc}. Call ray.init() yourself first, pass "
            "ray_address=, or use init(mode='connect', address=...) outside Ray",
            retryable=False,
        ) from exc
    return True


def _started_new_cluster() -> bool:
    """Whether ``ray.init`` started a new cluster rather than joining a running one (through
    ``ray_address``, ``$RAY_ADDRESS`` — set by job submission — or a local ``ray start``).
    Only a cluster we started is ours to empty at ``shutdown``."""
    try:
        from ray._private import worker

        return bool(getattr(worker._global_node, "head", False))
    except Exception:  # an internal that moved: assume we joined, never stop others' actors
        return False


def _init_with_ray(
    mode: str,
    namespace: str,
    env: EnvSettings,
    daemon_config_path: str | None,
    gs_mode: str | None,
    gs_address: str | None,
    gs_config_path: str | None,
    ports: PortConfig,
    show_logs: bool,
) -> _State:
    import ray

    started_ray = _ensure_ray(env)
    started_cluster = started_ray and _started_new_cluster()
    state: _State | None = None
    owned_gs = None
    owned = None
    try:
        node_id = ray.get_runtime_context().get_node_id()
        name = _actors.daemon_name(node_id)
        if mode == "connect":
            handle = _actors.get_actor(name, namespace)
            if handle is None:
                raise UnavailableError(
                    f"no tensorcast daemon runs on node {node_id} in namespace {namespace!r}; "
                    "start one with `tensorcast-ray daemon start`, or use init(mode='auto')"
                )
            owned = None
        else:
            daemon_cfg = ports.apply_daemon(load_daemon_config(daemon_config_path, env))
            effective_gs = gs_mode or ("connect" if gs_address else None)
            gs_handle, owned_gs = _global_store(
                mode, namespace, effective_gs, gs_config_path, env, ports
            )
            daemon_gs_mode = "none" if effective_gs == "none" or gs_handle is None else "connect"
            if mode == "create" and _actors.get_actor(name, namespace) is not None:
                raise FailedPreconditionError(
                    f"a tensorcast daemon already runs on node {node_id} in namespace "
                    f"{namespace!r}; use mode='connect' or 'auto', or stop it first "
                    "(`tensorcast-ray daemon stop`)"
                )
            handle = _actors.create_daemon(
                node_id,
                namespace,
                daemon_cfg.model_dump(mode="json"),
                detached=mode == "auto",
                get_if_exists=mode == "auto",
                global_store_mode=daemon_gs_mode,
                global_store_address=gs_address,
                show_logs=show_logs,
            )
            owned = handle if mode == "create" else None
        info = _actors.call(handle, "info", through_restarts=True)
        if mode == "auto":
            explicit = daemon_config_path is not None or (
                ports.daemon_listen_port is not None or ports.daemon_metrics_port is not None
            )
            _check_same_config(daemon_cfg, info, explicit=explicit)

        def resolve() -> str:
            # A restarting actor answers ActorUnavailableError at once; let Ray hold the call
            # until the restart finishes instead of burning the verb's attempts.
            import ray

            from tensorcast_ray._error_mapping import map_exception

            try:
                # By name: after `daemon stop` + `daemon start` the node's daemon is another
                # actor, and the handle from init() points at the dead one.
                current = _actors.get_actor(name, namespace) or handle
                ref = current.info.options(max_task_retries=-1).remote()
                return str(ray.get(ref, timeout=_actors.ACTOR_READY_TIMEOUT_S)["address"])
            except Exception as exc:
                raise map_exception(exc, context="re-resolving the daemon") from exc

        from tensorcast_ray._auth import namespace_token

        token = env.token or namespace_token(namespace)
        certs = _read_ca(env.tls_ca_file) if env.tls_ca_file else None
        if certs is None and info.get("tls_cert_pem"):
            certs = str(info["tls_cert_pem"]).encode()
        client = DaemonClient(
            info["address"], resolve_address=resolve, token=token, root_certificates=certs
        )
        ctx = _context(client, mode, namespace)
        state = _State(os.getpid(), ctx, client, started_ray, started_cluster, owned, owned_gs)
        return state
    except BaseException:
        if state is None:  # undo what this call started: a retry must find nothing of it
            for started in (owned, owned_gs):
                if started is not None:
                    try:
                        _actors.kill(started)
                    except ArtifactError:
                        logger.warning("could not stop %s after a failed init", started)
            if started_ray:
                ray.shutdown()
        raise


def _check_same_config(wanted: DaemonConfig, info: dict[str, Any], *, explicit: bool) -> None:
    """``auto`` attaches to the node's daemon if one runs; say so when it runs another config.

    Explicit settings (a config path or daemon ports) that the running daemon does not have
    are an error — the caller would silently not get them; a differing default is a warning
    (e.g. an operator started the daemon with its own config and the app calls ``init()``).
    """
    running = info.get("config_fingerprint")
    if not running or running == wanted.fingerprint():
        return
    message = (
        f"this node's daemon ({info.get('address')}) runs with another config than this process "
        "resolved (config path / TENSORCAST_RAY_DAEMON_CONFIG / port_config); it keeps its own. "
        "Pass identical startup arguments to every auto init, or use mode='connect'"
    )
    if explicit:
        raise FailedPreconditionError(message)
    logger.warning(message)


def _global_store(
    mode: str,
    namespace: str,
    gs_mode: str | None,
    config_path: str | None,
    env: EnvSettings,
    ports: PortConfig,
) -> tuple[Any, Any]:
    """(handle or None, handle we own or None) for the requested Global Store mode."""
    if gs_mode == "none":
        return None, None
    existing = _actors.get_actor(_actors.GLOBAL_STORE_NAME, namespace)
    if gs_mode == "connect":
        if existing is None:
            raise FailedPreconditionError(
                f"global_store_mode='connect' but no Global Store runs in namespace "
                f"{namespace!r}; start one with `tensorcast-ray global start` or use "
                "global_store_mode='start'"
            )
        _check_gs_version(existing)
        return existing, None
    if gs_mode == "start" and existing is not None:
        raise FailedPreconditionError(
            f"global_store_mode='start' but a Global Store already runs in namespace "
            f"{namespace!r}; use global_store_mode='connect', or stop it with "
            "`tensorcast-ray global stop`"
        )
    if existing is not None:  # None: converge on the one that exists
        _check_gs_version(existing)
        return existing, None
    cfg = ports.apply_global_store(load_global_store_config(config_path, env))
    handle = _actors.create_global_store(
        namespace,
        cfg.model_dump(mode="json"),
        detached=mode == "auto",
        get_if_exists=gs_mode is None and mode == "auto",
    )
    _actors.call(handle, "info", through_restarts=True)
    return handle, handle if mode == "create" else None


def _check_gs_version(handle: Any) -> None:
    # A Global Store Ray is restarting answers ActorUnavailableError at once: let Ray hold
    # the call until the restart finishes (bounded by the call's deadline).
    info = _actors.call(handle, "info", through_restarts=True)
    if not versions_compatible(__version__, info["version"]):
        raise FailedPreconditionError(
            f"incompatible tensorcast_ray versions: SDK {__version__}, daemon ?, Global Store "
            f"{info['version']}; install the same tensorcast_ray version everywhere"
        )


_at_exit_registered = False


def _register_at_exit() -> None:
    """Run :func:`shutdown` at interpreter exit, before Ray's own exit hook (``atexit`` runs
    handlers last-registered first, and Ray registers its own when it is imported): a script
    that ends without ``shutdown()`` still stops what its ``init`` started — Ray, or a
    ``mode="create"`` daemon — and frees their shared memory. A daemon of a cluster this
    process only joined keeps running, as with ``shutdown()``."""
    global _at_exit_registered
    if not _at_exit_registered:
        import atexit

        atexit.register(_shutdown_at_exit)
        _at_exit_registered = True


def _shutdown_at_exit() -> None:
    try:
        shutdown()
    except Exception:  # the interpreter is going away: say so, never raise from here
        logger.warning("tensorcast_ray.shutdown() at interpreter exit failed", exc_info=True)


def shutdown() -> None:
    """Disconnect; stop what this process's ``init(mode="create")`` started, and Ray if init
    started it. Safe to call twice, and in a forked child (it then only forgets)."""
    global _state
    with _lock:
        state, _state = _state, None
    if state is None:
        return
    _release(state)


def _release(state: _State) -> None:
    """Close ``state``'s connection and stop what it started (see :func:`shutdown`)."""
    if state.pid != os.getpid():
        return
    errors: list[ArtifactError] = []
    from tensorcast_ray._store import reset_process_state

    reset_process_state()
    if state.stager is not None:
        state.stager.close()
    state.client.close()
    for handle in (state.owned_daemon, state.owned_global_store):
        if handle is not None:
            try:
                _actors.kill(handle)
            except ArtifactError as exc:
                errors.append(exc)
    if state.started_ray:
        import ray

        if state.started_cluster and ray.is_initialized():
            # Ray goes away with us: stop the tensorcast actors cleanly first, or their
            # shared memory would outlive them in /dev/shm. A cluster we only joined keeps
            # its daemons: other jobs use them. (Not when the caller shut Ray down already:
            # listing actors would start a new Ray instance.)
            for name in _actors.named_actors(state.ctx.namespace):
                handle = _actors.get_actor(name, state.ctx.namespace)
                if handle is not None:
                    _actors.kill(handle)
        ray.shutdown()
    if errors:
        raise errors[0]
