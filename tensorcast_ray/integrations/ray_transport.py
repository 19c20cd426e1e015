"""Ray tensor transport ``"tensorcast"``: RDT tensors that move through the store.  [SDK, optional]

Ray Direct Transport (RDT) lets an actor method return tensors out of band: with
``@ray.method(tensor_transport="tensorcast")`` on an actor created with
``enable_tensor_transport=True`` the tensors of the return value skip Ray's pickle copy and
travel through the node's tensorcast daemon instead. Readers on the producer's node map
the same shared memory (zero-copy, read-only); a reader on another node has its daemon
pull the bytes once per node (later readers there map that copy). See docs/ray-transport.md.

One object, step by step:

1. [producer actor] the method returns; Ray pulls every ``torch.Tensor`` out of the value
   and calls :meth:`TensorcastTransport.extract_tensor_transport_metadata` →
   ``tc.register({"0": t0, "1": t1, ...}, key="_ray_rdt/<object id>:0")``: zero-copy for
   tensors allocated with ``tc.empty``, one copy into shared memory otherwise. A register
   is a lease: it ends at delete or when the producer process exits, so a dead producer
   leaves nothing behind. The metadata Ray keeps (key, artifact id, node, namespace) is a
   few hundred bytes whatever the size.
2. [reader actor, or the driver in ``ray.get``] :meth:`TensorcastTransport.recv_multiple_tensors`
   → ``tc.artifact(artifact_id=...).tensor_dict()`` in index order: the transport seam's SDK
   half (map, wrap) on this node, its daemon's pull from another node. With target buffers
   (``ray.experimental.set_target_for_ref``) the bytes are copied into them instead.
3. [producer actor] once Ray's reference counting frees the object,
   :meth:`TensorcastTransport.garbage_collect` → ``tc.delete(key)`` (cluster-wide; readers
   keep what they already hold, the memory returns when the last of them lets go).

**Received tensors are read-only.** They map the daemon's shared memory read-only, unlike
the writable tensors Ray's other transports hand out: an in-place write (``t.add_(1)``, an
optimizer step) is a segmentation fault, not an exception. ``.clone()`` what you modify,
or receive into your own buffers with ``ray.experimental.set_target_for_ref`` (a copy).

:func:`register` must run in the process that defines and creates the actors (the driver),
before the class is defined: Ray checks the transport name when ``@ray.method`` is applied,
and registers the transport on each actor created with ``enable_tensor_transport=True``.
This module imports Ray and torch; ``import tensorcast_ray`` never imports it.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
from collections.abc import Sequence
from typing import Any

from tensorcast_ray._errors import (
    ArtifactError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnimplementedError,
)

try:
    from ray.experimental import (
        CommunicatorMetadata,
        TensorTransportManager,
        TensorTransportMetadata,
    )

    _RAY_API_ERROR: str | None = None
except ImportError as _exc:  # an older Ray: register() says so; the module still imports
    _RAY_API_ERROR = f"{type(_exc).__name__}: {_exc}"

    @dataclasses.dataclass
    class TensorTransportMetadata:  # type: ignore[no-redef]
        tensor_meta: list[Any]
        tensor_device: str | None = None

    @dataclasses.dataclass
    class CommunicatorMetadata:  # type: ignore[no-redef]
        pass

    class TensorTransportManager:  # type: ignore[no-redef]
        pass


__all__ = [
    "KEY_PREFIX",
    "TRANSPORT",
    "TensorcastTransport",
    "TensorcastTransportMetadata",
    "check_ray_api",
    "is_registered",
    "register",
]

logger = logging.getLogger(__name__)

#: the name Ray knows the transport by (``tensor_transport="tensorcast"``, any case)
TRANSPORT = "TENSORCAST"
#: every RDT object is registered as ``f"{KEY_PREFIX}/{object id}:0"``
KEY_PREFIX = "_ray_rdt"
#: the parameters ``ray.experimental.register_tensor_transport`` must take (Ray 2.60)
_REGISTER_PARAMS = ("transport_name", "devices", "transport_manager_class", "data_type")
_NEEDED = (
    "Ray 2.60 or newer (ray.experimental.register_tensor_transport(transport_name, devices, "
    "transport_manager_class, data_type) and ray.experimental.TensorTransportManager)"
)
_lock = threading.Lock()
_registered = False


@dataclasses.dataclass
class TensorcastTransportMetadata(TensorTransportMetadata):
    """What Ray keeps and hands every reader of one RDT object: where its tensors live in
    tensorcast. ``key`` is empty for an object with no tensors (nothing was registered)."""

    key: str = ""
    artifact_id: str = ""
    #: the tensorcast namespace the producer wrote in; a reader not yet initialized joins it
    namespace: str = ""


# ---- the runtime check and registration -----------------------------------------------------
def _ray_version() -> str:
    try:
        import ray

        return str(ray.__version__)
    except ImportError:
        return "none (ray is not installed)"


def check_ray_api() -> Any:
    """[driver] ``ray.experimental.register_tensor_transport`` when the installed Ray has the
    custom tensor transport API this module is written against; FAILED_PRECONDITION
    (naming the Ray found and the one needed) otherwise."""
    try:
        import ray.experimental as rexp
    except ImportError as exc:
        raise FailedPreconditionError(
            f"tensor_transport='tensorcast' needs Ray; none is importable ({exc}). Install "
            f"{_NEEDED}"
        ) from exc
    found = _ray_version()
    fn = getattr(rexp, "register_tensor_transport", None)
    base = getattr(rexp, "TensorTransportManager", None)
    if fn is None or base is None or _RAY_API_ERROR is not None:
        missing = "register_tensor_transport" if fn is None else "TensorTransportManager"
        raise FailedPreconditionError(
            f"Ray {found} has no ray.experimental.{missing}: custom tensor transports need "
            f"{_NEEDED}. Upgrade Ray, or leave tensor_transport at its default (Ray's object "
            "store)"
        )
    if not issubclass(TensorcastTransport, base):
        raise FailedPreconditionError(
            f"Ray {found}'s TensorTransportManager is not the one this module was imported "
            "with (Ray was reloaded or patched after import); import "
            "tensorcast_ray.integrations.ray_transport after Ray"
        )
    try:
        params = tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError) as exc:
        raise FailedPreconditionError(
            f"Ray {found}: the signature of ray.experimental.register_tensor_transport cannot "
            f"be read ({exc}); tensor_transport='tensorcast' needs {_NEEDED}"
        ) from exc
    if params[: len(_REGISTER_PARAMS)] != _REGISTER_PARAMS or any(
        p.default is inspect.Parameter.empty
        for p in list(inspect.signature(fn).parameters.values())[len(_REGISTER_PARAMS) :]
    ):
        raise FailedPreconditionError(
            f"Ray {found}'s ray.experimental.register_tensor_transport takes "
            f"({', '.join(params)}); "
            f"tensor_transport='tensorcast' is written for ({', '.join(_REGISTER_PARAMS)}), "
            f"{_NEEDED}. Install a Ray whose API matches, or leave tensor_transport at its "
            "default"
        )
    return fn


def _registered_class() -> type | None:
    """The class Ray has under ``TENSORCAST`` in this process, if its registry can be read."""
    try:
        from ray.experimental.rdt import util
    except ImportError:
        return None
    info = getattr(util, "transport_manager_info", {}).get(TRANSPORT)
    return None if info is None else getattr(info, "transport_manager_class", None)


def _is_ours(cls: type) -> bool:
    # By name, not identity: a reloaded module (or a worker that imported it twice) is ours.
    ours = TensorcastTransport
    return (cls.__module__, cls.__qualname__) == (ours.__module__, ours.__qualname__)


def register(devices: Sequence[str] = ("cpu",)) -> None:
    """[driver] Register the one-sided tensor transport ``TENSORCAST`` with Ray, so
    ``@ray.method(tensor_transport="tensorcast")`` returns tensors through the store.

    Call it in the process that defines and creates the actors, before the actor class is
    defined (Ray checks the name at ``@ray.method``) and before the actors are created (Ray
    registers it on each actor created with ``enable_tensor_transport=True``). A second call
    in a process is a no-op.

    ``devices`` is ``["cpu"]`` and nothing else for now: the store hands GPU tensors to
    another process only through CUDA IPC, which is not built yet, so announcing ``"cuda"``
    would let Ray route GPU tensors here only to fail them (use Ray's ``nccl`` or
    ``cuda_ipc`` transports for GPU tensors meanwhile).

    Raises FAILED_PRECONDITION when the installed Ray lacks the custom-transport API (or its
    signature differs), or when another class is already registered as ``TENSORCAST`` in
    this process; UNIMPLEMENTED for ``"cuda"``; INVALID_ARGUMENT for other devices.
    """
    global _registered
    if isinstance(devices, str) or not isinstance(devices, Sequence) or not devices:
        raise InvalidArgumentError(f"devices must be a list such as ['cpu'], got {devices!r}")
    for device in devices:
        if device == "cuda":
            raise UnimplementedError(
                "devices=['cuda'] needs the store's CUDA IPC path, which is not built yet; "
                "register with devices=['cpu'] and move GPU tensors with Ray's 'nccl' or "
                "'cuda_ipc' transports"
            )
        if device != "cpu":
            raise InvalidArgumentError(f"devices: {device!r} is not supported; pass ['cpu']")
    with _lock:
        if _registered:
            return
        fn = check_ray_api()
        existing = _registered_class()
        if existing is not None:
            if not _is_ours(existing):
                raise FailedPreconditionError(
                    f"a tensor transport named {TRANSPORT} is already registered in this "
                    f"process with {existing.__module__}.{existing.__qualname__}; only one "
                    "class can hold a name, so tensor_transport='tensorcast' would not reach "
                    "tensorcast_ray (rename or drop the other registration)"
                )
            _registered = True
            return
        import torch

        try:
            fn(TRANSPORT, ["cpu"], TensorcastTransport, torch.Tensor)
        except ValueError as exc:  # registered meanwhile, behind our back
            existing = _registered_class()
            if existing is None or not _is_ours(existing):
                raise FailedPreconditionError(
                    f"Ray refused to register the {TRANSPORT} tensor transport: {exc}"
                ) from exc
        _registered = True


def is_registered() -> bool:
    """Whether :func:`register` ran (or found this transport registered) in this process."""
    return _registered


# ---- the transport ----------------------------------------------------------------------------
def _tc() -> Any:
    import tensorcast_ray as tc

    return tc


def _ensure_initialized(namespace: str | None = None) -> Any:
    """tensorcast in this process: as it is, or ``tc.init()`` (in ``namespace`` when the
    object's metadata names one). Actors should call ``tc.init(...)`` themselves in
    ``__init__``; this is the fallback for those that do not."""
    from tensorcast_ray import _bootstrap

    tc = _tc()
    if not _bootstrap.is_initialized():
        tc.init(namespace=namespace or None)
    current = _bootstrap.current().ctx.namespace
    if namespace and current != namespace:
        raise FailedPreconditionError(
            f"this RDT object's tensors live in tensorcast namespace {namespace!r}, but this "
            f"process is initialized in {current!r}; call tc.init(namespace={namespace!r}) "
            "here (or produce the object in this namespace)"
        )
    return tc


def _check_tensors(obj_id: str, tensors: Sequence[Any]) -> None:
    import torch

    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(
                f"RDT object {obj_id}: value {i} is a {type(t).__name__}, not a torch.Tensor"
            )
        if t.device.type != "cpu":
            hint = (
                "a meta tensor holds no bytes to send"
                if t.device.type == "meta"
                else "GPU tensors need the store's CUDA IPC path, which is not built yet; "
                "return t.cpu(), or use Ray's 'nccl' / 'cuda_ipc' transports for GPU tensors"
            )
            raise FailedPreconditionError(
                f"tensor_transport='tensorcast' moves CPU tensors only; tensor {i} of RDT "
                f"object {obj_id} is on {t.device} ({tuple(t.shape)}, {t.dtype}): {hint}"
            )


class TensorcastTransport(TensorTransportManager):
    """Ray's ``TensorTransportManager`` for ``TENSORCAST``: one instance per process, made
    by Ray. Each method says which process Ray calls it in."""

    def __init__(self) -> None:
        # [producer] the objects this process registered, by Ray object id: a retried task
        # (its reply was lost) describes the same primary copy again and gets the same
        # metadata back instead of ALREADY_EXISTS.
        self._produced: dict[str, TensorcastTransportMetadata] = {}
        self._lock = threading.Lock()

    def tensor_transport_backend(self) -> str:
        # A method, as TensorTransportManager declares it (Ray's CUDA IPC transport makes it
        # a property; Ray itself calls neither on a custom transport).
        return TRANSPORT

    @staticmethod
    def is_one_sided() -> bool:
        # A reader maps (or its daemon pulls) the bytes; the producer takes no part.
        return True

    @staticmethod
    def can_abort_transport() -> bool:
        # Ray's monitor aborts a transfer that failed or outlived RAY_rdt_fetch_fail_timeout
        # (60 s); with False it kills the producer and the reader. Nothing here can hang
        # either side: the producer takes no part in a read (one-sided), and a read is a
        # tensorcast call bounded by its retry deadline (40 s for get), whose failure Ray
        # hands the reader as an error. So a stuck transfer needs no kill: abort is a no-op.
        return True

    def actor_has_tensor_transport(self, actor: Any) -> bool:
        # Any actor that can import tensorcast_ray can read; checking would be a blocking
        # call before every task submission.
        return True

    # ---- [producer actor] --------------------------------------------------------------
    def extract_tensor_transport_metadata(
        self, obj_id: str, rdt_object: list[Any]
    ) -> TensorcastTransportMetadata:
        """[producer] Register the object's tensors as one version; runs right after the
        method returned, in the producer's process."""
        tensors = list(rdt_object)
        _check_tensors(obj_id, tensors)
        tensor_meta = [(t.shape, t.dtype) for t in tensors]
        if not tensors:
            return TensorcastTransportMetadata(tensor_meta=[], tensor_device=None)
        with self._lock:
            known = self._produced.get(obj_id)
        if known is not None:
            return known
        tc = _ensure_initialized()
        from tensorcast_ray import _bootstrap
        from tensorcast_ray._store import default_store
        from tensorcast_ray._write import _buffer_refs

        key = f"{KEY_PREFIX}/{obj_id}:0"
        named = {str(i): t for i, t in enumerate(tensors)}
        try:
            result = tc.register(named, key=key)
        except FailedPreconditionError:
            if _buffer_refs(default_store(), named) is None:  # not the frozen-buffer case
                raise
            # A tc.empty buffer backs one live version: these tensors are already out in an
            # earlier object whose refs are alive. Share a copy this time.
            logger.info(
                "RDT object %s: its tc.empty tensors already back a live version; "
                "registering a copy",
                obj_id,
            )
            result = tc.register({n: t.clone() for n, t in named.items()}, key=key)
        ctx = _bootstrap.current().ctx
        meta = TensorcastTransportMetadata(
            tensor_meta=tensor_meta,
            tensor_device="cpu",
            key=result.key,
            artifact_id=result.artifact_id,
            namespace=ctx.namespace,
        )
        with self._lock:
            self._produced[obj_id] = meta
        return meta

    def garbage_collect(
        self, obj_id: str, tensor_transport_meta: TensorTransportMetadata, tensors: list[Any]
    ) -> None:
        """[producer] Ray freed the object: delete its version (cluster-wide). Readers keep
        the tensors they hold; the memory returns once the last of them lets go."""
        with self._lock:
            self._produced.pop(obj_id, None)
        key = getattr(tensor_transport_meta, "key", "")
        if not key:
            return
        try:
            _tc().delete(key)
        except NotFoundError:
            pass  # already gone: the lease ended, or a retried free
        except ArtifactError as exc:
            # Ray would only log it; the version still ends with this process's lease.
            logger.warning(
                "RDT object %s: deleting %s failed (%s); it stays until this process exits",
                obj_id,
                key,
                exc,
            )

    def send_multiple_tensors(
        self,
        tensors: list[Any],
        tensor_transport_metadata: TensorTransportMetadata,
        communicator_metadata: CommunicatorMetadata,
    ) -> None:
        raise NotImplementedError(
            "the tensorcast transport is one-sided: readers fetch, the producer never sends"
        )

    # ---- [driver: the owner of the ref] --------------------------------------------------
    def get_communicator_metadata(
        self, src_actor: Any, dst_actor: Any, backend: str | None = None
    ) -> CommunicatorMetadata:
        return CommunicatorMetadata()

    # ---- [reader: an actor the ref is passed to, or the driver in ray.get] ---------------
    def recv_multiple_tensors(
        self,
        obj_id: str,
        tensor_transport_metadata: TensorTransportMetadata,
        communicator_metadata: CommunicatorMetadata,
        target_buffers: list[Any] | None = None,
    ) -> list[Any]:
        """[reader] The object's tensors in order: read-only zero-copy views of this node's
        shared memory (pulled here once per node from another node), or copies into
        ``target_buffers`` when given."""
        meta = tensor_transport_metadata
        if not isinstance(meta, TensorcastTransportMetadata):
            raise InvalidArgumentError(
                f"RDT object {obj_id}: metadata is a {type(meta).__name__}, not the "
                "tensorcast transport's"
            )
        count = len(meta.tensor_meta)
        if not count:
            return []
        tc = _ensure_initialized(meta.namespace)
        try:
            art = tc.artifact(artifact_id=meta.artifact_id)
            if target_buffers:
                if len(target_buffers) != count:
                    raise InvalidArgumentError(
                        f"RDT object {obj_id} holds {count} tensors, but "
                        f"{len(target_buffers)} target buffers were set"
                    )
                art.tensor_dict_into({str(i): b for i, b in enumerate(target_buffers)})
                return list(target_buffers)
            got = art.tensor_dict()
        except NotFoundError as exc:
            raise NotFoundError(
                f"the tensors of RDT object {obj_id} ({meta.key}) are gone from tensorcast: "
                "the actor that returned them exited (its register lease ended) or called "
                f"tc.shutdown(), or the object was freed ({exc.message})"
            ) from exc
        return [got[str(i)] for i in range(count)]

    def abort_transport(self, obj_id: str, communicator_metadata: CommunicatorMetadata) -> None:
        # A read ends on its own by its deadline (see can_abort_transport); nothing to undo.
        logger.info(
            "RDT object %s: Ray aborted its transfer (the read ends by its deadline)", obj_id
        )
