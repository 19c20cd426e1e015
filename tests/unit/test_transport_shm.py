"""The shared-memory transport: the conformance suite, its daemon-only parts, the registry."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorcast_ray import _transport
from tensorcast_ray._errors import FailedPreconditionError, InvalidArgumentError
from tensorcast_ray._shm import SegmentPool
from tensorcast_ray._transport import known_transports, transport_class
from tensorcast_ray._transport.shm import ShmTransport
from tensorcast_ray.testing import TransportConformance

PREFIX = "tcr-transport-000000000000-"


def _ours(shm_dir: Path) -> list[str]:
    return [n for n in os.listdir(shm_dir) if n.startswith(PREFIX)]


class TestShmTransport(TransportConformance):
    @pytest.fixture(params=[0, 2], ids=["unpooled", "pooled"])
    def transport(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ShmTransport]:
        t = ShmTransport.for_daemon(
            str(tmp_path),
            PREFIX,
            segment_bytes=self.segment_bytes,
            reserve_bytes=request.param * self.segment_bytes,
        )
        if request.param:
            assert t.pool.wait_ready(request.param * self.segment_bytes, timeout=30)
        yield t
        t.close()
        assert _ours(tmp_path) == [], "every region is freed"


@pytest.fixture
def daemon_half(tmp_path: Path) -> Iterator[ShmTransport]:
    t = ShmTransport.for_daemon(str(tmp_path), PREFIX, segment_bytes=64 * 1024, reserve_bytes=0)
    yield t
    t.close()


def test_the_sdk_half_cannot_allocate(tmp_path: Path) -> None:
    sdk = ShmTransport(str(tmp_path))
    with pytest.raises(FailedPreconditionError, match="only the node daemon"):
        sdk.allocate(4096)
    assert sdk.ready_bytes() == 0
    sdk.close()  # nothing to stop


def test_the_sdk_half_reads_what_the_daemon_half_allocated(
    daemon_half: ShmTransport, tmp_path: Path
) -> None:
    import torch

    ref = daemon_half.allocate(4096)
    region = daemon_half.map_for_write(ref, prefault=True)
    daemon_half.fill(region, torch.arange(8, dtype=torch.int64), 0)
    daemon_half.unmap(region)
    sdk = ShmTransport(str(tmp_path))
    base = sdk.wrap_base(sdk.map_for_read(ref))
    assert base[:64].view(torch.int64).tolist() == list(range(8))
    daemon_half.free([ref])


def test_staging_sizes_are_the_pools_size_classes(tmp_path: Path) -> None:
    pool = SegmentPool(str(tmp_path), PREFIX, segment_bytes=32 << 20, reserve_bytes=32 << 20)
    daemon_half = ShmTransport(str(tmp_path), pool=pool)  # never started: no files made
    whole, small = pool.segment_bytes, pool.small_bytes
    assert small, "this pool has a small class"
    assert daemon_half.staging_size(pool.min_pooled_bytes - 1) == 0, "between the classes"
    assert daemon_half.staging_size(pool.min_pooled_bytes) == whole
    assert daemon_half.staging_size(whole) == whole
    assert daemon_half.staging_size(whole + 1) == 0, "larger than a pooled segment"
    assert daemon_half.staging_size(small) == small
    assert daemon_half.staging_size(small // 16) == small
    assert daemon_half.staging_size(small // 16 - 1) == 0, "too small to take a pooled one"


def test_shrink_cuts_a_segment_and_ignores_one_that_is_gone(
    daemon_half: ShmTransport, tmp_path: Path
) -> None:
    name, size = daemon_half.allocate(64 * 1024)
    daemon_half.shrink(name, 4096)
    assert os.path.getsize(tmp_path / name) == 4096
    daemon_half.free([(name, size)])
    daemon_half.shrink(name, 4096)  # deleted meanwhile: nothing to do
    assert not (tmp_path / name).exists()


def test_the_registry_names_what_it_has() -> None:
    assert known_transports() == ("shm",)
    assert transport_class("shm") is ShmTransport
    with pytest.raises(InvalidArgumentError, match="known transports: shm"):
        transport_class("carrier_pigeon")


def test_a_missing_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _transport._Entry("tensorcast_ray._transport.not_installed", "X", "cuda")
    monkeypatch.setitem(_transport._KNOWN, "cuda_ipc", entry)
    with pytest.raises(FailedPreconditionError, match=r"pip install 'tensorcast_ray\[cuda\]'"):
        transport_class("cuda_ipc")


def test_transports_are_imported_only_when_asked_for() -> None:
    code = (
        "import sys, tensorcast_ray, tensorcast_ray._transport as t\n"
        "print('tensorcast_ray._transport.shm' in sys.modules, 'torch' in sys.modules)\n"
        "t.transport_class('shm')\n"
        "print('tensorcast_ray._transport.shm' in sys.modules, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False", "True", "False"], proc.stdout
