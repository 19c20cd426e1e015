"""``tensorcast-ray``: operate daemons and the Global Store of a Ray cluster.  [CLI]

    tensorcast-ray [--address ADDR] [--namespace NS] daemon start|status|stop ...
    tensorcast-ray ... global start|status|stop ...
    tensorcast-ray ... ls [PREFIX] | inspect KEY   (the cluster catalog of the Global Store)
    tensorcast-ray ... persist status [KEY | --task ID] [--wait]   (persistence tasks)

``--address`` / ``--namespace`` may also follow the group or the command
(``tensorcast-ray daemon status --namespace X``); the one given last wins.

Exit codes: 0 success; 1 the operation failed (e.g. no daemon to stop); 2 bad usage;
3 no Ray cluster reachable. Errors go to stderr, results to stdout.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from tensorcast_ray import _actors
from tensorcast_ray._config import from_env, load_daemon_config, load_global_store_config
from tensorcast_ray._errors import ArtifactError

EXIT_FAILED = 1
EXIT_NO_RAY = 3

STATUS_FIELDS = (
    "node_id",
    "version",
    "address",
    "metrics_address",
    "uptime_s",
    "clients",
    "artifacts",
    "bytes",
)


class Ctx:
    """What the connection options said, wherever on the command line they stood."""

    def __init__(self) -> None:
        self.address: str | None = None
        self.namespace_option: str | None = None

    @property
    def namespace(self) -> str:
        return self.namespace_option or from_env().namespace or _actors.DEFAULT_NAMESPACE

    @contextmanager
    def ray(self) -> Iterator[Any]:
        import ray

        address = self.address or from_env().ray_address or "auto"
        if not _gcs_port_open(address):
            click.echo(
                f"error: no Ray cluster reachable at {address!r} (nothing listens there). "
                "Start one with `ray start --head`, or pass --address / set RAY_ADDRESS.",
                err=True,
            )
            sys.exit(EXIT_NO_RAY)
        try:
            ray.init(
                address=address,
                namespace=self.namespace,
                log_to_driver=False,
                logging_level=logging.ERROR,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            click.echo(
                f"error: no Ray cluster reachable at {address!r} ({exc}). Start one with "
                "`ray start --head`, or pass --address / set RAY_ADDRESS.",
                err=True,
            )
            sys.exit(EXIT_NO_RAY)
        try:
            yield ray
        finally:
            ray.shutdown()


def _gcs_port_open(address: str, timeout: float = 3.0) -> bool:
    """False only when ``address`` is ``host:port`` and nothing accepts a TCP connection there.

    ``ray.init`` retries an unreachable GCS for minutes before giving up; a refused or
    unanswered connection is answered here within ``timeout`` seconds instead.
    """
    import socket

    if "://" in address or address in ("auto", "local"):
        return True
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return True  # let ray.init report the malformed address
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FAILED)


def guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn ArtifactError into a one-line message and exit code 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except ArtifactError as exc:
            fail(str(exc))

    return wrapper


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # One Ctx for the whole command line: the value given last (innermost) wins.
    if value is not None:
        obj = ctx.ensure_object(Ctx)
        if param.name == "address":
            obj.address = value
        else:
            obj.namespace_option = value


def connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--address`` / ``--namespace``, accepted before or after any command that talks to
    Ray (``tensorcast-ray daemon status --namespace X`` is what people type)."""
    fn = click.option(
        "--namespace",
        default=None,
        expose_value=False,
        callback=_remember,
        help="Ray namespace of the tensorcast actors "
        "(default: $TENSORCAST_RAY_NAMESPACE or tensorcast_ray).",
    )(fn)
    return click.option(
        "--address",
        default=None,
        expose_value=False,
        callback=_remember,
        help="Ray cluster address (default: $RAY_ADDRESS, else auto).",
    )(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@connection_options
@click.version_option(package_name="tensorcast_ray")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Operate tensorcast_ray daemons and the Global Store of a Ray cluster."""
    ctx.ensure_object(Ctx)


# ---- daemon --------------------------------------------------------------------------------
@cli.group()
@connection_options
def daemon() -> None:
    """Node daemons (one per node)."""


def _alive_nodes(ray: Any) -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


def _this_node(ray: Any) -> str:
    return str(ray.get_runtime_context().get_node_id())


@daemon.command("start")
@click.option("--config", "config_path", default=None, help="Daemon YAML config file.")
@click.option(
    "--global-store-mode",
    type=click.Choice(["none", "connect"]),
    default=None,
    help="connect: register with the namespace's Global Store (fails if none runs); "
    "none: do not. Default: connect when one runs.",
)
@click.option("--all-nodes", is_flag=True, help="Start a daemon on every alive node.")
@connection_options
@click.pass_obj
@guarded
def daemon_start(
    obj: Ctx, config_path: str | None, global_store_mode: str | None, all_nodes: bool
) -> None:
    """Start detached daemons on this node (or on every alive node)."""
    config = load_daemon_config(config_path).model_dump(mode="json")
    with obj.ray() as ray:
        gs = _actors.get_actor(_actors.GLOBAL_STORE_NAME, obj.namespace)
        if global_store_mode == "connect" and gs is None:
            fail(
                f"--global-store-mode connect, but no Global Store runs in namespace "
                f"{obj.namespace!r}; start one with `tensorcast-ray global start`"
            )
        global_store_mode = global_store_mode or ("connect" if gs is not None else "none")
        nodes = _alive_nodes(ray) if all_nodes else [_this_node(ray)]
        handles = [
            _actors.create_daemon(
                node,
                obj.namespace,
                config,
                detached=True,
                get_if_exists=True,
                global_store_mode=global_store_mode,
                global_store_address=None,
            )
            for node in nodes
        ]
        for node, handle in zip(nodes, handles, strict=True):
            info = _actors.call(handle, "info")
            click.echo(
                f"daemon on node {node}: {info['address']} (metrics {info['metrics_address']})"
            )


def _daemon_statuses(ray: Any, namespace: str, all_nodes: bool) -> list[dict[str, Any]]:
    nodes = _alive_nodes(ray) if all_nodes else [_this_node(ray)]
    handles = {n: _actors.get_actor(_actors.daemon_name(n), namespace) for n in nodes}
    refs = {n: h.status.remote() for n, h in handles.items() if h is not None}
    out = []
    for node, ref in refs.items():
        try:
            out.append(ray.get(ref, timeout=30))
        except Exception as exc:  # one sick daemon must not hide the others
            out.append({"node_id": node, "error": str(exc)})
    return out


@daemon.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per daemon.")
@click.option("--all", "all_nodes", is_flag=True, help="Every alive node, not just this one.")
@connection_options
@click.pass_obj
@guarded
def daemon_status(obj: Ctx, as_json: bool, all_nodes: bool) -> None:
    """Show daemons: address, clients, artifacts, bytes, leases, tier usage, build."""
    with obj.ray() as ray:
        statuses = _daemon_statuses(ray, obj.namespace, all_nodes)
    if as_json:
        click.echo(json.dumps(statuses, indent=2, sort_keys=True))
    elif not statuses:
        click.echo(f"no tensorcast daemon in namespace {obj.namespace!r}", err=True)
    else:
        click.echo(_table(statuses))
    if not statuses:
        sys.exit(EXIT_FAILED)


def _table(statuses: list[dict[str, Any]]) -> str:
    cols = [
        "node_id",
        "address",
        "version",
        "uptime_s",
        "clients",
        "artifacts",
        "bytes",
        "leases",
        "tier",
    ]
    rows = []
    for s in statuses:
        tiers = ", ".join(
            f"{t['tier']} {_fmt_bytes(int(t['used_bytes']))}/{_fmt_bytes(int(t['capacity_bytes']))}"
            for t in s.get("tiers", [])
        )
        rows.append(
            [
                str(s.get("node_id", ""))[:12],
                str(s.get("address", s.get("error", ""))),
                str(s.get("version", "")),
                f"{float(s.get('uptime_s', 0)):.0f}",
                str(s.get("clients", "")),
                str(s.get("artifacts", "")),
                _fmt_bytes(int(s.get("bytes", 0) or 0)),
                str(s.get("leases", "")),
                tiers,
            ]
        )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    if statuses and "build" in statuses[0]:
        lines.append(f"build: {statuses[0]['build']}")
    return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


@daemon.command("stop")
@click.option("--all", "all_nodes", is_flag=True, help="Stop the daemons of every alive node.")
@connection_options
@click.pass_obj
@guarded
def daemon_stop(obj: Ctx, all_nodes: bool) -> None:
    """Stop daemons cleanly (their shared memory is freed)."""
    with obj.ray() as ray:
        nodes = _alive_nodes(ray) if all_nodes else [_this_node(ray)]
        handles = {n: _actors.get_actor(_actors.daemon_name(n), obj.namespace) for n in nodes}
        found = {n: h for n, h in handles.items() if h is not None}
        for node, handle in found.items():
            _actors.kill(handle)
            click.echo(f"stopped daemon on node {node}")
    if not found:
        fail(f"no tensorcast daemon to stop in namespace {obj.namespace!r}")


# ---- Global Store ----------------------------------------------------------------------------
@cli.group("global")
@connection_options
def global_store() -> None:
    """The Global Store (one per cluster)."""


@global_store.command("start")
@click.option("--config", "config_path", default=None, help="Global Store YAML config file.")
@connection_options
@click.pass_obj
@guarded
def global_start(obj: Ctx, config_path: str | None) -> None:
    """Start the detached Global Store; fails if one already runs."""
    config = load_global_store_config(config_path).model_dump(mode="json")
    with obj.ray():
        if _actors.get_actor(_actors.GLOBAL_STORE_NAME, obj.namespace) is not None:
            fail(f"a Global Store already runs in namespace {obj.namespace!r}")
        handle = _actors.create_global_store(
            obj.namespace, config, detached=True, get_if_exists=False
        )
        info = _actors.call(handle, "info")
        click.echo(f"Global Store: {info['address']} (metrics {info['metrics_address']})")


@global_store.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
@guarded
def global_status(obj: Ctx, as_json: bool) -> None:
    """Show the Global Store: address, catalog size, daemons known."""
    with obj.ray():
        handle = _actors.get_actor(_actors.GLOBAL_STORE_NAME, obj.namespace)
        if handle is None:
            fail(
                f"no Global Store in namespace {obj.namespace!r}; start one with "
                "`tensorcast-ray global start`"
            )
        status = _actors.call(handle, "status", timeout=30)
    if as_json:
        click.echo(json.dumps(status, indent=2, sort_keys=True))
        return
    for key in ("address", "metrics_address", "version", "uptime_s", "keys", "artifacts"):
        click.echo(f"{key:16} {status.get(key)}")
    click.echo(f"{'daemons':16} {len(status.get('daemons', []))}")
    for d in status.get("daemons", []):
        click.echo(f"  {d['node_id'][:12]}  {d['address']}  {d['version']}")


@global_store.command("stop")
@connection_options
@click.pass_obj
@guarded
def global_stop(obj: Ctx) -> None:
    """Stop the Global Store."""
    with obj.ray():
        handle = _actors.get_actor(_actors.GLOBAL_STORE_NAME, obj.namespace)
        if handle is None:
            fail(f"no Global Store to stop in namespace {obj.namespace!r}")
        _actors.kill(handle)
        click.echo("stopped the Global Store")


# ---- the cluster catalog: ls / inspect -------------------------------------------------------
REPLICA_ORDER = ("original", "replica", "cache")
INSPECT_TENSORS_SHOWN = 20
CALL_TIMEOUT_S = 30.0


def _ask(ref: Any, what: str, timeout: float = CALL_TIMEOUT_S) -> Any:
    """``ray.get`` of one actor call; a failure (our error, unwrapped from Ray's, or Ray's
    own) becomes an ArtifactError whose message says what was asked."""
    import ray

    from tensorcast_ray._error_mapping import map_exception

    try:
        return ray.get(ref, timeout=timeout)
    except Exception as exc:
        raise map_exception(exc, context=what) from exc


def _catalog(obj: Ctx) -> tuple[Any, str]:
    """The namespace's Global Store and the namespace token its methods take (in ``obj.ray()``)."""
    from tensorcast_ray._auth import namespace_token

    handle = _actors.get_actor(_actors.GLOBAL_STORE_NAME, obj.namespace)
    if handle is None:
        fail(
            f"no Global Store in namespace {obj.namespace!r}, so there is no cluster catalog to "
            "read; start one with `tensorcast-ray global start` (then the daemons, "
            "`tensorcast-ray daemon start --all-nodes`)"
        )
    return handle, from_env().token or namespace_token(obj.namespace)


def _sorted_replicas(replicas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def rank(r: dict[str, Any]) -> tuple[int, str]:
        kind = str(r.get("kind", ""))
        return (REPLICA_ORDER.index(kind) if kind in REPLICA_ORDER else 99, str(r["node_id"]))

    return sorted(replicas, key=rank)


def _columns(rows: list[list[str]], header: list[str], indent: str = "") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += [indent + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return [line.rstrip() for line in lines]


@cli.command("ls")
@click.argument("prefix", default="")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per key.")
@connection_options
@click.pass_obj
@guarded
def ls_command(obj: Ctx, prefix: str, as_json: bool) -> None:
    """List the cluster's keys: size, tensors, durability, the nodes holding each.

    Reads the Global Store's catalog; PREFIX keeps the keys that start with it. DURABLE is
    yes once a complete copy is on shared disk (a persistence task finished).
    """
    with obj.ray():
        handle, token = _catalog(obj)
        entries: list[dict[str, Any]] = _ask(
            handle.list_artifacts.remote(token, prefix), "list the Global Store's catalog"
        )
    for entry in entries:
        entry["replicas"] = _sorted_replicas(list(entry.get("replicas", [])))
    if as_json:
        click.echo(json.dumps(entries, indent=2, sort_keys=True))
        return
    if not entries:
        where = f" starting with {prefix!r}" if prefix else ""
        click.echo(f"no keys{where} in namespace {obj.namespace!r}", err=True)
        return
    rows = [
        [
            str(e["key"]),
            _fmt_bytes(int(e.get("nbytes", 0))),
            str(e.get("tensors", "")),
            "yes" if e.get("durable") else "no",
            ",".join(f"{str(r['node_id'])[:12]}({r.get('kind', '?')})" for r in e["replicas"]),
        ]
        for e in entries
    ]
    click.echo("\n".join(_columns(rows, ["KEY", "SIZE", "TENSORS", "DURABLE", "NODES"])))


def _describe(
    namespace: str, token: str, entry: dict[str, Any]
) -> tuple[list[dict[str, Any]], str]:
    """The artifact's tensors, from the first node holding it that describes them (the
    writer's copy first), and why none could if none did."""
    from tensorcast_ray._layout import Columns
    from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2

    reasons = []
    for replica in entry["replicas"]:
        node = str(replica["node_id"])
        handle = _actors.get_actor(_actors.daemon_name(node), namespace)
        if handle is None:
            reasons.append(f"{node[:12]}: no daemon")
            continue
        try:
            meta = _ask(
                handle.describe_artifact.remote(token, entry["artifact_id"]),
                f"describe {entry['key']} on node {node[:12]}",
            )
            if meta is None:
                reasons.append(f"{node[:12]}: holds no copy")
                continue
            # A stored table is placed: decoding it checks the placement against its
            # segments (``(name, size)`` pairs).
            sizes = [int(size) for _, size in meta.get("segments", [])]
            cols = Columns.from_table(common_pb2.TensorTable.FromString(meta["tensors"]), sizes)
        except ArtifactError as exc:
            reasons.append(f"{node[:12]}: {exc.message}")
            continue
        tensors = [
            {"name": n, "dtype": d, "shape": list(s), "nbytes": nb}
            for n, d, s, nb in zip(cols.names, cols.dtypes, cols.shapes, cols.nbytes, strict=True)
        ]
        return tensors, ""
    return [], "; ".join(reasons) or "no node holds it"


def _persistence_of(namespace: str, token: str, entry: dict[str, Any]) -> dict[str, Any]:
    """``durable`` and the persistence task's id / state / error, as the writer's daemon
    tells it (the catalog's ``durable`` flag alone when that daemon is gone or forgot)."""
    task_id = str(entry.get("persist_task_id") or "")
    out: dict[str, Any] = {
        "durable": bool(entry.get("durable")),
        "persistence_task_id": task_id or None,
        "persistence_state": "success" if entry.get("durable") else None,
        "persistence_error": None,
    }
    writer = str(entry.get("node_id") or "")
    handle = _actors.get_actor(_actors.daemon_name(writer), namespace) if writer else None
    if not task_id or handle is None:
        return out
    try:
        status = _ask(
            handle.persistence_status.remote(token, task_id, 0.0),
            f"persistence status of {entry['key']} on node {writer[:12]}",
        )
    except ArtifactError as exc:
        out["persistence_error"] = f"(status unavailable: {exc.message})"
        return out
    if status is not None:
        out["durable"] = out["durable"] or bool(status.get("durable"))
        out["persistence_state"] = status.get("state") or out["persistence_state"]
        error = status.get("last_error") or status.get("degraded_reason") or ""
        out["persistence_error"] = error or None
    return out


def _copies(namespace: str, token: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Each holding node's copy: the catalog's node/kind/tier, and the node's own account
    of it (``served_by``: ``local`` written there, else the transport that brought it)."""
    asked = {}
    for replica in entry["replicas"]:
        node = str(replica["node_id"])
        handle = _actors.get_actor(_actors.daemon_name(node), namespace)
        if handle is not None:
            asked[node] = handle.copy_info.remote(token, entry["artifact_id"])
    out = []
    for replica in entry["replicas"]:
        node = str(replica["node_id"])
        row: dict[str, Any] = {
            "node_id": node,
            "kind": replica.get("kind"),
            "tier": replica.get("tier"),
            "served_by": None,
            "requirement": None,
            "retention": None,
        }
        if node not in asked:
            row["error"] = "no tensorcast daemon on that node"
        else:
            try:
                info = _ask(asked[node], f"copy_info on node {node[:12]}")
            except ArtifactError as exc:
                row["error"] = exc.message
            else:
                if info is None:
                    row["error"] = "the node's daemon holds no copy (dropped since)"
                else:
                    for field in ("served_by", "requirement", "retention"):
                        row[field] = info.get(field)
        out.append(row)
    return out


@cli.command("inspect")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
@guarded
def inspect_command(obj: Ctx, key: str, as_json: bool) -> None:
    """Show one artifact: tensors, replicas, how each copy got there.

    KEY is name:version (name:latest resolves to the newest). Prints its id, size, writer and
    commit seq, its tensors (the first 20; --json lists all) and, per node holding it, the
    copy's kind, tier and how it was served (local: written there; object_store /
    collective: the transport that brought it), and whether it is durable (a complete copy
    on shared disk) with the state of its persistence task.
    """
    with obj.ray():
        handle, token = _catalog(obj)
        entry: dict[str, Any] = _ask(
            handle.resolve.remote(token, key), f"resolve {key} in the Global Store"
        )
        entry["replicas"] = _sorted_replicas(list(entry.get("replicas", [])))
        tensors, why = _describe(obj.namespace, token, entry)
        copies = _copies(obj.namespace, token, entry)
        persistence = _persistence_of(obj.namespace, token, entry)
    report: dict[str, Any] = {
        "key": entry["key"],
        "artifact_id": entry["artifact_id"],
        "nbytes": int(entry.get("nbytes", 0)),
        "kind": entry.get("kind"),
        "writer": entry.get("node_id"),
        "seq": entry.get("seq"),
        "created_unix_ms": entry.get("created_unix_ms"),
        "ntensors": int(entry.get("tensors", len(tensors))),
        "tensors": tensors,
        "replicas": copies,
        **persistence,
    }
    if why:
        report["tensors_error"] = why
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    click.echo(_inspect_text(report))


def _inspect_text(report: dict[str, Any]) -> str:
    import datetime

    created = report.get("created_unix_ms") or 0
    when = (
        datetime.datetime.fromtimestamp(created / 1000, tz=datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
        if created
        else "?"
    )
    lines = [
        f"{'key':12} {report['key']}",
        f"{'artifact_id':12} {report['artifact_id']}",
        f"{'size':12} {_fmt_bytes(report['nbytes'])} ({report['nbytes']} bytes)",
        f"{'kind':12} {report['kind']}",
        f"{'writer':12} {report['writer']}",
        f"{'seq':12} {report['seq']}",
        f"{'created':12} {when}",
        f"{'durable':12} {'yes' if report.get('durable') else 'no'}",
    ]
    if report.get("persistence_task_id"):
        lines.append(
            f"{'persistence':12} {report.get('persistence_state') or '?'} "
            f"(task {report['persistence_task_id']})"
        )
    if report.get("persistence_error"):
        lines.append(f"{'persist_err':12} {report['persistence_error']}")
    tensors = report["tensors"]
    if report.get("tensors_error"):
        lines.append(
            f"{'tensors':12} {report['ntensors']} (names unavailable: {report['tensors_error']})"
        )
    else:
        lines.append(f"{'tensors':12} {len(tensors)}")
        shown = tensors[:INSPECT_TENSORS_SHOWN]
        if shown:
            rows = [
                [
                    t["name"],
                    t["dtype"],
                    "[" + ", ".join(map(str, t["shape"])) + "]",
                    _fmt_bytes(t["nbytes"]),
                ]
                for t in shown
            ]
            lines += _columns(rows, ["NAME", "DTYPE", "SHAPE", "SIZE"], indent="  ")
        if len(tensors) > len(shown):
            lines.append(f"  ... and {len(tensors) - len(shown)} more (--json lists all)")
    copies = report["replicas"]
    lines.append(f"{'replicas':12} {len(copies)}")
    if copies:
        rows = [
            [
                str(c["node_id"])[:12],
                str(c["kind"]),
                str(c["tier"]),
                str(c["served_by"]) if c["served_by"] else f"? ({c.get('error', '')})",
            ]
            for c in copies
        ]
        lines += _columns(rows, ["NODE", "KIND", "TIER", "SERVED_BY"], indent="  ")
    return "\n".join(lines)


# ---- export / import -------------------------------------------------------------------------
def _storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``k=v`` pairs; a value that starts with ``{`` / ``[`` or is true/false/null is JSON."""
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--storage-option")
        if value[:1] in ("{", "[") or value in ("true", "false", "null"):
            try:
                options[name] = json.loads(value)
            except ValueError as exc:
                raise click.BadParameter(
                    f"{name}: {value!r} is not valid JSON ({exc})", param_hint="--storage-option"
                ) from None
        else:
            options[name] = value
    return options


@contextmanager
def _progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr, shown from the first byte moved (a failure before prints none)."""
    from tqdm import tqdm

    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(
                tqdm(
                    desc=label,
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=sys.stderr,
                )
            )
        bar = bars[0]
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


@contextmanager
def _client(obj: Ctx) -> Iterator[Any]:
    """This node's running daemon, over the Ray cluster the CLI joined (never starts one)."""
    import tensorcast_ray as tc

    with obj.ray():
        tc.init(mode="connect", namespace=obj.namespace)
        try:
            yield tc
        finally:
            tc.shutdown()


STORAGE_OPTION = click.option(
    "--storage-option",
    "storage_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec storage option, repeatable (e.g. endpoint_url=http://…); JSON values "
    'such as client_kwargs=\'{"region_name": "us-east-1"}\' are decoded.',
)


@cli.command("export")
@click.argument("key")
@click.argument("url")
@STORAGE_OPTION
@connection_options
@click.pass_obj
@guarded
def export_cmd(obj: Ctx, key: str, url: str, storage_option: tuple[str, ...]) -> None:
    """Export artifact KEY (name:latest resolves once) under the root URL; prints its directory."""
    options = _storage_options(storage_option)
    with _client(obj) as tc, _progress_bar(f"export {key}") as progress:
        path = tc.export(key, url, storage_options=options or None, progress=progress)
    click.echo(path)


@cli.command("import")
@click.argument("url")
@click.argument("key")
@click.option("--names", default=None, help="Comma-separated tensor names (default: all).")
@STORAGE_OPTION
@connection_options
@click.pass_obj
@guarded
def import_cmd(
    obj: Ctx, url: str, key: str, names: str | None, storage_option: tuple[str, ...]
) -> None:
    """Import a safetensors checkpoint or an export directory at URL as version KEY."""
    options = _storage_options(storage_option)
    selected = [n for n in names.split(",") if n] if names is not None else None
    with _client(obj) as tc, _progress_bar(f"import {key}") as progress:
        result = tc.import_checkpoint(
            url, key, names=selected, storage_options=options or None, progress=progress
        )
    click.echo(f"{result.key} {result.artifact_id} {result.nbytes} bytes {result.status}")


def _seconds(value: float) -> float:
    """A duration option: finite and not negative (``nan`` compares false to every bound)."""
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"{value} is not a number of seconds >= 0")
    return value


# ---- persistence tasks -----------------------------------------------------------------------
PERSIST_POLL_WAIT_S = 1.0  # --wait: each status call waits this long for the task to end


@cli.group("persist")
@connection_options
def persist() -> None:
    """Persistence tasks: the durable copies a put's StorePolicy asks for."""


def _optional_seconds(
    _ctx: click.Context, _param: click.Parameter, value: float | None
) -> float | None:
    return None if value is None else _seconds(value)


@persist.command("status")
@click.argument("key", required=False)
@click.option("--task", "task_id", default=None, help="A task id (PutResult.persistence_task_id).")
@click.option("--wait", is_flag=True, help="Show a progress bar until the task ends.")
@click.option(
    "--timeout",
    type=float,
    default=None,
    callback=_optional_seconds,
    help="With --wait: give up after this many seconds (exit 1, DEADLINE_EXCEEDED).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@connection_options
@click.pass_obj
@guarded
def persist_status(
    obj: Ctx,
    key: str | None,
    task_id: str | None,
    wait: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Show the persistence task of version KEY (or of --task ID): state, progress, shards.

    KEY is name:version (name:latest resolves to the newest). --wait shows a progress bar
    over the task's bytes until it ends, then the final status. Exit code 1, with the
    task's error on stderr, when the task failed (or ended without a complete disk copy);
    0 otherwise (success, degraded with a durable copy, or still under way without --wait).
    """
    if (key is None) == (task_id is None):
        raise click.UsageError("pass KEY or --task ID (exactly one)")
    if timeout is not None and not wait:
        raise click.UsageError("--timeout goes with --wait")
    with _client(obj) as tc:
        store = tc.store()
        if wait:
            status = _wait_with_bar(store, key, task_id, timeout)
        else:
            status = store.persistence_status(task_id, key=key)
    if as_json:
        click.echo(json.dumps(status.to_dict(), indent=2, sort_keys=True))
    else:
        click.echo(_persist_text(status))
    error = status.error()
    if status.state == "failed" or (status.done and error is not None and not status.durable):
        fail(str(error) if error is not None else f"persistence of {status.key} failed")


def _wait_with_bar(store: Any, key: str | None, task_id: str | None, timeout: float | None) -> Any:
    """Poll the task (each call waits up to a second for it to end) with a tqdm bar over
    its bytes; the final status, or DEADLINE_EXCEEDED after ``timeout`` seconds."""
    import time

    from tensorcast_ray._errors import DeadlineExceededError
    from tensorcast_ray._persistence import persistence_status

    deadline = None if timeout is None else time.monotonic() + timeout
    status = persistence_status(store, task_id, key)
    label = f"persist {status.key}"
    with _progress_bar(label) as progress:
        while True:
            total = sum(s.total_bytes for s in status.shards) or status.nbytes
            done = sum(s.done_bytes for s in status.shards) if status.shards else 0
            if status.done and status.durable:
                done = total
            progress(min(done, total), total)
            if status.done:
                return status
            left = PERSIST_POLL_WAIT_S
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceededError(
                        f"persistence of {status.key} ({status.task_id}) is still "
                        f"{status.state} after {timeout} s ({status.progress:.0%} done)"
                    )
            by_task = status.task_id or task_id  # the task found by key, from now on
            status = persistence_status(
                store, by_task, None if by_task else key, wait_s=min(left, PERSIST_POLL_WAIT_S)
            )


def _persist_text(status: Any) -> str:
    def when(ms: int) -> str:
        import datetime

        if not ms:
            return "-"
        return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc).isoformat(
            timespec="seconds"
        )

    total = sum(s.total_bytes for s in status.shards) or status.nbytes
    done = sum(s.done_bytes for s in status.shards)
    lines = [
        f"{'task':12} {status.task_id}",
        f"{'key':12} {status.key}",
        f"{'artifact_id':12} {status.artifact_id}",
        f"{'state':12} {status.state}",
        f"{'progress':12} {status.progress:.0%} ({_fmt_bytes(done)} of {_fmt_bytes(total)})",
        f"{'durable':12} {'yes' if status.durable else 'no'}",
        f"{'node':12} {status.node_id or '?'}",
        f"{'started':12} {when(status.started_unix_ms)}",
        f"{'finished':12} {when(status.finished_unix_ms)}",
    ]
    if status.degraded_reason:
        lines.append(f"{'degraded':12} {status.degraded_reason}")
    if status.last_error:
        code = f"[{status.last_error_code}] " if status.last_error_code else ""
        lines.append(f"{'error':12} {code}{status.last_error}")
    lines.append(f"{'shards':12} {len(status.shards)}")
    if status.shards:
        rows = [
            [
                str(s.index),
                s.tier,
                s.state,
                f"{s.progress:.0%}",
                str(s.attempts),
                _fmt_bytes(s.total_bytes),
                s.target + (f" ({s.error})" if s.error else ""),
            ]
            for s in status.shards
        ]
        lines += _columns(
            rows, ["INDEX", "TIER", "STATE", "PROGRESS", "ATTEMPTS", "SIZE", "TARGET"], "  "
        )
    return "\n".join(lines)


@cli.command("gc")
@click.option(
    "--shm-dir", default=None, help="Shared-memory directory (default: the daemon config's)."
)
@click.option(
    "--min-age",
    type=float,
    callback=lambda _ctx, _param, value: _seconds(value),
    default=600.0,
    show_default=True,
    help="Only prefixes whose files are all older than this many seconds.",
)
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@guarded
def gc_command(shm_dir: str | None, min_age: float, dry_run: bool, as_json: bool) -> None:
    """Remove shared memory left on this host by daemons that died for good.

    A prefix is stale when the daemon process that owned it is gone and none of its files
    changed for --min-age seconds. Needs no Ray cluster.
    """
    from tensorcast_ray._auth import default_socket_dir
    from tensorcast_ray._gc import collect

    config = load_daemon_config()
    directory = shm_dir or config.shm_dir
    found = collect(
        directory,
        min_age_s=min_age,
        dry_run=dry_run,
        socket_dir=config.socket_dir or default_socket_dir(),
    )
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "prefix": f.prefix,
                        "files": len(f.files),
                        "bytes": f.nbytes,
                        "owner_pid": f.owner_pid,
                        "removed": not dry_run,
                    }
                    for f in found
                ],
                indent=2,
            )
        )
        return
    verb = "would remove" if dry_run else "removed"
    for f in found:
        click.echo(
            f"{verb} {f.prefix}* : {len(f.files)} files, {_fmt_bytes(f.nbytes)} "
            f"(owner pid {f.owner_pid or '?'})"
        )
    if not found:
        click.echo(f"no stale tensorcast shared memory in {directory}")


def main() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cli(prog_name="tensorcast-ray")


if __name__ == "__main__":
    main()
