"""Who may drive a daemon or a Global Store: the namespace token.  [SDK, daemon, Global Store]

Every gRPC call to a daemon or a Global Store carries the namespace's token as
``authorization: Bearer <token>`` metadata; the server checks it (:class:`TokenCheck`, one
interceptor on both servers) before it decodes the request, and answers anything else
UNAUTHENTICATED. The daemon's unix socket checks the peer's credentials instead
(:mod:`tensorcast_ray._local_channel`). docs/security.md has the whole trust model.

Where the token comes from, step by step:

1. [daemon, Global Store, SDK in Ray] :func:`namespace_token`: the first process of a Ray
   cluster that asks for a namespace's token creates a random one in Ray's internal KV
   (put without overwrite, then read back, so concurrent first callers agree on one); every
   other Ray-connected process reads the same. Whoever can talk to the Ray cluster can
   read it: Ray's own access control is the boundary there.
2. [daemon] writes it to ``<socket_dir>/<prefix>token`` (mode 0600 in the private 0700
   socket directory), with its port, for processes of the same user outside Ray.
3. [SDK outside Ray] ``init(mode="connect", address=...)``: ``$TENSORCAST_RAY_TOKEN`` if set,
   else :func:`token_for_address` finds the token file of the daemon at that port (for an
   address on this host only).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from tensorcast_ray._error_mapping import abort_with
from tensorcast_ray._errors import PermissionDeniedError, UnavailableError

__all__ = [
    "TOKEN_ENV",
    "TokenCheck",
    "call_metadata",
    "default_socket_dir",
    "namespace_token",
    "remove_token_file",
    "tls_cert_for_address",
    "tls_server_credentials",
    "token_file",
    "token_for_address",
    "write_token_file",
]

TOKEN_ENV = "TENSORCAST_RAY_TOKEN"
_METADATA_KEY = "authorization"
_KV_NAMESPACE = "tensorcast_ray"
_TOKEN_SUFFIX = "token"


def default_socket_dir() -> str:
    """The daemon's socket directory unless its config names one (per user: /tmp is shared)."""
    return f"/tmp/tcr-{os.getuid()}"


def namespace_token(namespace: str) -> str:
    """[daemon, Global Store, SDK in Ray] The token of ``namespace`` in this Ray cluster,
    created by the first caller. Needs a connected Ray (a driver or an actor)."""
    from ray.experimental import internal_kv

    key = f"token:{namespace}".encode()
    try:
        internal_kv._internal_kv_put(
            key, secrets.token_urlsafe(32).encode(), overwrite=False, namespace=_KV_NAMESPACE
        )
        value = internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
    except Exception as exc:  # the GCS is unreachable or restarting
        raise UnavailableError(
            f"cannot read the token of namespace {namespace!r} from Ray's internal KV: {exc}"
        ) from exc
    if not value:
        raise UnavailableError(f"Ray's internal KV holds no token for namespace {namespace!r}")
    return bytes(value).decode()


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """[SDK] The metadata a call carries (none without a token: the server then says how)."""
    return ((_METADATA_KEY, f"Bearer {token}"),) if token else ()


def unauthenticated_error() -> PermissionDeniedError:
    return PermissionDeniedError(
        "this call carries no valid tensorcast token (UNAUTHENTICATED). A process in the Ray "
        "cluster gets it through Ray (tensorcast_ray.init does); one outside Ray that connects "
        f"by address reads ${TOKEN_ENV}, else the token file its daemon writes for its own "
        f"user: {default_socket_dir()}/<prefix>{_TOKEN_SUFFIX} (mode 0600; the socket_dir of "
        "the daemon config if set). See docs/security.md",
        grpc.StatusCode.UNAUTHENTICATED,
        retryable=False,
    )


class TokenCheck(grpc.aio.ServerInterceptor):
    """[daemon, Global Store] Let a call through only if it carries ``token``; anything else
    is aborted UNAUTHENTICATED before its request is even decoded."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("a server needs a non-empty token")
        self._expected = f"Bearer {token}".encode()

        async def deny(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await abort_with(context, unauthenticated_error())

        # No deserializer: a refused request stays bytes, never parsed.
        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        for key, value in handler_call_details.invocation_metadata or ():
            if key == _METADATA_KEY:
                given = value.encode() if isinstance(value, str) else bytes(value)
                if hmac.compare_digest(given, self._expected):
                    return await continuation(handler_call_details)
        return self._deny


# ---- the token file, for processes of the daemon's user outside Ray ------------------------


def _is_this_host(host: str) -> bool:
    """Whether ``host`` names this machine: loopback, or what a daemon bound to all
    interfaces publishes (the address of this host's name)."""
    import ipaddress
    import socket

    try:
        resolved = socket.gethostbyname(host)
        if ipaddress.ip_address(resolved).is_loopback:
            return True
        return resolved == socket.gethostbyname(socket.gethostname())
    except (OSError, ValueError):
        return False


def token_file(socket_dir: str, prefix: str) -> str:
    return os.path.join(socket_dir, prefix + _TOKEN_SUFFIX)


def write_token_file(path: str, token: str, port: int, tls_cert: str) -> None:
    """[daemon] Write ``path`` (0600) atomically: a reader never sees half a file.
    ``tls_cert``: the PEM certificate the daemon's gRPC server presents ("" without TLS)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"port": port, "token": token, "tls_cert": tls_cert}, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_token_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def token_for_address(address: str, socket_dir: str | None = None) -> str | None:
    """[SDK] The token in this user's token file of the daemon serving ``address``'s port
    (the newest, if a crashed daemon left one for the same port), or None. Only for an
    address on this host: a token must never go to whatever listens on that port elsewhere."""
    data = _daemon_file(address, socket_dir)
    return str(data["token"]) if data else None


def tls_cert_for_address(address: str, socket_dir: str | None = None) -> bytes | None:
    """[SDK] The TLS certificate the token file of the daemon at ``address`` names, or None."""
    data = _daemon_file(address, socket_dir)
    cert = data.get("tls_cert") if data else None
    return cert.encode() if isinstance(cert, str) and cert else None


def _daemon_file(address: str, socket_dir: str | None) -> dict[str, Any] | None:
    host, _, port_text = address.rpartition(":")
    if not port_text.isdigit() or not _is_this_host(host.strip("[]")):
        return None
    folder = socket_dir or default_socket_dir()
    try:
        names = [n for n in os.listdir(folder) if n.endswith(_TOKEN_SUFFIX)]
    except OSError:
        return None
    found: list[tuple[float, str, dict[str, Any]]] = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                continue  # only a file of this user: another could plant one
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("port") == int(port_text):
            token = data.get("token")
            if isinstance(token, str) and token:
                found.append((st.st_mtime, name, data))
    return max(found)[2] if found else None


# ---- TLS for a gRPC server bound beyond loopback --------------------------------------------


def tls_server_credentials(cert_file: str, key_file: str) -> tuple[grpc.ServerCredentials, bytes]:
    """[daemon] The server credentials of a PEM certificate and key, and the certificate
    (clients trust it); INVALID_ARGUMENT naming a file that cannot be read."""
    from tensorcast_ray._errors import InvalidArgumentError

    pems = []
    for field, path in (("tls_cert_file", cert_file), ("tls_key_file", key_file)):
        try:
            with open(os.path.expanduser(path), "rb") as f:
                pems.append(f.read())
        except OSError as exc:
            raise InvalidArgumentError(
                f"daemon config {field}={path!r} cannot be read: {exc}; give a PEM file"
            ) from exc
    cert, key = pems
    return grpc.ssl_server_credentials([(key, cert)]), cert
