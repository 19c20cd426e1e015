"""Registration of the ``TENSORCAST`` Ray tensor transport, without a Ray cluster: the
installed Ray's API is checked at run time (a fake of an older Ray without it, or with
another signature, gets FAILED_PRECONDITION naming the Ray found), a second register() is a
no-op, another class already holding the name is a clear error, and only CPU is offered.
Each test registers into an empty copy of Ray's transport table, never the process's own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import ray
import ray.experimental
from ray.experimental.rdt import util as rdt_util

from tensorcast_ray import FailedPreconditionError, InvalidArgumentError, UnimplementedError
from tensorcast_ray.integrations import ray_transport


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A fresh, empty transport table in Ray's registry, and a module that registered nothing."""
    fresh: dict[str, Any] = {}
    monkeypatch.setattr(rdt_util, "transport_manager_info", fresh)
    monkeypatch.setattr(rdt_util, "has_custom_transports", False)
    monkeypatch.setattr(rdt_util, "_default_transports_registered", False)
    monkeypatch.setattr(ray_transport, "_registered", False)
    yield fresh


def test_register_adds_a_one_sided_cpu_transport_once(table: dict[str, Any]) -> None:
    import torch

    ray_transport.register()
    info = table["TENSORCAST"]
    assert info.transport_manager_class is ray_transport.TensorcastTransport
    assert (info.devices, info.data_type) == (["cpu"], torch.Tensor)
    assert ray_transport.is_registered()
    assert rdt_util.is_one_sided_transport("TENSORCAST")
    ray_transport.register()  # idempotent: Ray's own register would raise ValueError here
    assert table["TENSORCAST"] is info


def test_a_transport_registered_by_the_process_before_is_adopted(table: dict[str, Any]) -> None:
    import torch

    ray.experimental.register_tensor_transport(
        "tensorcast", ["cpu"], ray_transport.TensorcastTransport, torch.Tensor
    )
    ray_transport.register()  # Ray's workers register it that way: not an error
    assert ray_transport.is_registered()


def test_another_class_under_the_name_is_a_clear_error(table: dict[str, Any]) -> None:
    import torch

    class Other(ray.experimental.TensorTransportManager):  # type: ignore[misc]
        pass

    ray.experimental.register_tensor_transport("TENSORCAST", ["cpu"], Other, torch.Tensor)
    with pytest.raises(FailedPreconditionError, match=r"already registered .*Other"):
        ray_transport.register()
    assert not ray_transport.is_registered()


def test_a_ray_without_the_api_is_failed_precondition(
    table: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake of an older Ray: no ray.experimental.register_tensor_transport.
    monkeypatch.delattr(ray.experimental, "register_tensor_transport")
    with pytest.raises(FailedPreconditionError) as info:
        ray_transport.register()
    err = info.value
    assert err.status_code == grpc.StatusCode.FAILED_PRECONDITION and not err.retryable
    assert f"Ray {ray.__version__} has no ray.experimental.register_tensor_transport" in str(err)
    assert "Ray 2.60 or newer" in str(err)
    assert not table


def test_a_ray_without_the_manager_class_is_failed_precondition(
    table: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(ray.experimental, "TensorTransportManager")
    with pytest.raises(
        FailedPreconditionError, match=r"no ray\.experimental\.TensorTransportManager"
    ):
        ray_transport.register()


def test_a_ray_with_another_signature_is_failed_precondition(
    table: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []

    def older(name: str, transport_manager_class: type) -> None:  # a fake of another API
        calls.append((name, transport_manager_class))

    monkeypatch.setattr(ray.experimental, "register_tensor_transport", older)
    with pytest.raises(FailedPreconditionError) as info:
        ray_transport.register()
    assert info.value.status_code == grpc.StatusCode.FAILED_PRECONDITION
    assert "takes (name, transport_manager_class)" in str(info.value)
    assert "transport_name, devices, transport_manager_class, data_type" in str(info.value)
    assert not calls and not table


def test_an_extra_required_parameter_is_another_signature(
    table: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def newer(
        transport_name: str,
        devices: list[str],
        transport_manager_class: type,
        data_type: type,
        x: int,
    ) -> None:
        raise AssertionError("must not be called")

    monkeypatch.setattr(ray.experimental, "register_tensor_transport", newer)
    with pytest.raises(FailedPreconditionError, match="takes"):
        ray_transport.register()


@pytest.mark.parametrize(
    ("devices", "error"),
    [
        (["cuda"], UnimplementedError),
        (["cpu", "cuda"], UnimplementedError),
        (["tpu"], InvalidArgumentError),
        ("cpu", InvalidArgumentError),
        ([], InvalidArgumentError),
    ],
)
def test_only_cpu_is_offered(table: dict[str, Any], devices: Any, error: type) -> None:
    with pytest.raises(error):
        ray_transport.register(devices)
    assert not table


def test_metadata_and_static_capabilities() -> None:
    t = ray_transport.TensorcastTransport()
    assert t.tensor_transport_backend() == "TENSORCAST"
    assert t.is_one_sided() and t.can_abort_transport()
    assert t.actor_has_tensor_transport(None)
    meta = ray_transport.TensorcastTransportMetadata(tensor_meta=[], tensor_device=None)
    assert t.recv_multiple_tensors("x", meta, t.get_communicator_metadata(None, None)) == []
    t.garbage_collect("x", meta, [])  # nothing was registered: nothing to delete
    with pytest.raises(NotImplementedError):
        t.send_multiple_tensors([], meta, t.get_communicator_metadata(None, None))
