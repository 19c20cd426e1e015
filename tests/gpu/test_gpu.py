"""GPU paths (marker ``gpu``; skipped without CUDA). Run wherever a GPU is available.

What exists today: CUDA tensors are put through host shared memory (one D2H copy) and read
back to a GPU with one H2D copy. CUDA IPC register is not built yet, so it must say so.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_put_cuda_tensors_and_get_them_back_on_gpu(namespace: str) -> None:
    import tensorcast_ray as tc

    tc.init(namespace=namespace, global_store_mode="none")
    src = {
        "w": torch.randn(256, 256, device="cuda").to(torch.bfloat16),
        "b": torch.arange(10, device="cuda"),
    }
    tc.put(src, key="gpu:v1")
    on_cpu = tc.get("gpu:v1")
    assert on_cpu["w"].device.type == "cpu"
    on_gpu = tc.get("gpu:v1", device="cuda:0")
    for name, tensor in src.items():
        assert on_gpu[name].device.type == "cuda"
        assert torch.equal(on_gpu[name], tensor)


def test_get_into_gpu_targets(namespace: str) -> None:
    import tensorcast_ray as tc

    tc.init(namespace=namespace, global_store_mode="none")
    tc.put({"w": torch.arange(64.0).reshape(8, 8)}, key="gpu:v2")
    target = {"w": torch.zeros(8, 8, device="cuda")}
    ptr = target["w"].data_ptr()
    tc.get_into("gpu:v2", target)
    assert target["w"].data_ptr() == ptr, "get_into copies in place"
    assert torch.equal(target["w"].cpu(), torch.arange(64.0).reshape(8, 8))


def test_register_of_cuda_tensors_says_ipc_is_not_built(namespace: str) -> None:
    import tensorcast_ray as tc

    tc.init(namespace=namespace, global_store_mode="none")
    with pytest.raises(tc.UnimplementedError) as err:
        tc.register({"w": torch.ones(4, device="cuda")}, key="gpu:v3")
    assert "CUDA IPC" in str(err.value)
    assert not tc.exists("gpu:v3")
