"""Names, creation options and lookups of tensorcast_ray's Ray actors.  [SDK, CLI]

All actors live in one Ray namespace (default ``tensorcast_ray``): daemons are named
``daemon:<node_id>``, the Global Store ``global_store``. ``auto`` creation uses
``get_if_exists=True`` so concurrent callers converge on one actor per name.
"""

from __future__ import annotations

from typing import Any

from tensorcast_ray._error_mapping import map_exception
from tensorcast_ray._errors import FailedPreconditionError, UnavailableError

DEFAULT_NAMESPACE = "tensorcast_ray"
GLOBAL_STORE_NAME = "global_store"
ACTOR_READY_TIMEOUT_S = 120.0


def message_to_dict(message: Any) -> dict[str, Any]:
    """A protobuf message as a JSON-able dict with int64 fields as ints (not strings)."""
    from google.protobuf.json_format import MessageToDict

    data: dict[str, Any] = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _int64_fields(message, data)


def _int64_fields(message: Any, data: dict[str, Any]) -> dict[str, Any]:
    from google.protobuf.descriptor import FieldDescriptor

    int64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64}
    for field in message.DESCRIPTOR.fields:
        value = data.get(field.name)
        if value is None:
            continue
        repeated = field.is_repeated
        if field.type in int64:
            data[field.name] = [int(v) for v in value] if repeated else int(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            items = getattr(message, field.name)
            if repeated:
                data[field.name] = [_int64_fields(m, d) for m, d in zip(items, value, strict=True)]
            else:
                data[field.name] = _int64_fields(items, value)
    return data


#: the Global Store's threads: catalog calls, journal writes, the daemons' held watches
_GS_GROUPS = {"control": 4, "journal": 4, "watch": 32}


def daemon_name(node_id: str) -> str:
    return f"daemon:{node_id}"


def get_actor(name: str, namespace: str) -> Any | None:
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def call(
    handle: Any,
    method: str,
    *args: Any,
    timeout: float = ACTOR_READY_TIMEOUT_S,
    through_restarts: bool = False,
) -> Any:
    """``ray.get`` of one actor call with a deadline; Ray errors mapped to ours.
    ``through_restarts``: an actor Ray is restarting gets the call once it is back (within
    the deadline) instead of failing at once."""
    import ray

    fn = getattr(handle, method)
    if through_restarts:
        fn = fn.options(max_task_retries=-1)
    try:
        return ray.get(fn.remote(*args), timeout=timeout)
    except Exception as exc:  # Ray's wrapper of our error too: map_exception unwraps it
        raise map_exception(exc, context=f"actor call {method}") from exc


def create_daemon(
    node_id: str,
    namespace: str,
    config: dict[str, Any],
    *,
    detached: bool,
    get_if_exists: bool,
    global_store_mode: str,
    global_store_address: str | None,
    show_logs: bool = False,
    version_override: str | None = None,
) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tensorcast_ray.daemon.actor import DaemonActor

    options: dict[str, Any] = {
        "name": daemon_name(node_id),
        "namespace": namespace,
        "get_if_exists": get_if_exists,
        "max_restarts": -1,
        "max_task_retries": 0,
        "num_cpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
    }
    if detached:
        options["lifetime"] = "detached"
    try:
        return (
            ray.remote(concurrency_groups={"control": 4, "transfer": 16})(DaemonActor)  # type: ignore[call-overload]
            .options(**options)
            .remote(
                config,
                namespace,
                global_store_mode,
                global_store_address,
                show_logs,
                version_override,
            )
        )
    except ValueError as exc:
        if not _name_taken(exc):
            raise
        raise FailedPreconditionError(
            f"a tensorcast daemon already runs on node {node_id} in namespace {namespace!r}; "
            "use mode='connect' or mode='auto', or stop it with `tensorcast-ray daemon stop`"
        ) from exc


def create_global_store(
    namespace: str,
    config: dict[str, Any],
    *,
    detached: bool,
    get_if_exists: bool,
    version_override: str | None = None,
) -> Any:
    import ray

    from tensorcast_ray.global_store.actor import GlobalStoreActor

    options: dict[str, Any] = {
        "name": GLOBAL_STORE_NAME,
        "namespace": namespace,
        "get_if_exists": get_if_exists,
        "max_restarts": -1,
        "max_task_retries": 0,
        "num_cpus": 0,
    }
    head = _head_node_id()
    if head is not None:
        # On the head node: it goes only with the cluster (whose GCS lives there too), never
        # with a worker node that leaves (it would restart elsewhere and rebuild its catalog
        # meanwhile). Hard: a soft preference lets Ray spill it to the caller's node.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=False)
    if detached:
        options["lifetime"] = "detached"
    try:
        return (
            ray.remote(concurrency_groups=_GS_GROUPS)(GlobalStoreActor)  # type: ignore[call-overload]
            .options(**options)
            .remote(config, namespace, version_override)
        )
    except ValueError as exc:
        if not _name_taken(exc):
            raise
        raise FailedPreconditionError(
            f"a Global Store already runs in namespace {namespace!r}; use "
            "global_store_mode='connect', or stop it with `tensorcast-ray global stop`"
        ) from exc


def _head_node_id() -> str | None:
    import ray

    try:
        for node in ray.nodes():
            if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
                return str(node["NodeID"])
    except Exception:  # Ray Client or a GCS hiccup: let Ray place it
        return None
    return None


def _name_taken(exc: ValueError) -> bool:
    return "already taken" in str(exc)


def kill(handle: Any, *, graceful: bool = True, timeout: float = 30.0) -> None:
    """Stop an actor for good: a clean ``stop()`` (frees shared memory), then ``ray.kill``."""
    import ray

    if graceful:
        try:
            ray.get(handle.stop.remote(), timeout=timeout)
        except Exception:  # already dead or unreachable: ray.kill below still applies
            pass
    try:
        ray.kill(handle, no_restart=True)
    except Exception as exc:
        raise UnavailableError(f"could not kill actor: {exc}") from exc


def named_actors(namespace: str) -> list[str]:
    """Names of the live named actors of ``namespace`` (no dashboard needed)."""
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace
    ]
