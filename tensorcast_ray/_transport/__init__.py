"""Transports by name, imported only when one is asked for.  [SDK, daemon]

Each entry names the module and class of one transport and the extra that installs what it
needs, so importing ``tensorcast_ray`` never needs CUDA, cupy or NCCL, and a missing piece
says what to install (fsspec's registry does the same for file systems).  An entry is added
when its transport is built and passes :mod:`tensorcast_ray.testing`'s conformance suite.

Today the only SDK ↔ daemon transport is ``shm``, which needs nothing optional, so the read
cache, the write pipeline and the daemon import :class:`~._transport.shm.ShmTransport`
directly; the registry is how code picks a transport by name (the conformance tests, and the
ordered fallback once a second one exists). The daemon ↔ daemon paths between nodes,
:mod:`~._transport.object_store` and :mod:`~._transport.collective`, are not in it: they move
an artifact's segments between two daemons, not tensors to an SDK, and the cluster tier
(``daemon/remote.py``) picks between them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from tensorcast_ray._errors import FailedPreconditionError, InvalidArgumentError
from tensorcast_ray._transport.base import Capabilities, SegmentRef, Transport

__all__ = ["Capabilities", "SegmentRef", "Transport", "known_transports", "transport_class"]


@dataclass(frozen=True)
class _Entry:
    module: str
    cls: str
    extra: str | None  # the tensorcast_ray extra that installs its dependencies


_KNOWN: dict[str, _Entry] = {
    "shm": _Entry("tensorcast_ray._transport.shm", "ShmTransport", None),
}


def known_transports() -> tuple[str, ...]:
    """The names of every built transport, sorted (whether or not its extra is installed)."""
    return tuple(sorted(_KNOWN))


def transport_class(name: str) -> type[Transport]:
    """The transport class registered as ``name``, imported now.  [SDK, daemon]"""
    entry = _KNOWN.get(name)
    if entry is None:
        raise InvalidArgumentError(
            f"unknown transport {name!r}; known transports: {', '.join(known_transports())}"
        )
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        install = (
            f"pip install 'tensorcast_ray[{entry.extra}]'"
            if entry.extra
            else "reinstall tensorcast_ray"
        )
        raise FailedPreconditionError(
            f"transport {name!r} needs a package that is not installed ({exc}); {install}"
        ) from exc
    cls: type[Transport] = getattr(module, entry.cls)
    return cls
