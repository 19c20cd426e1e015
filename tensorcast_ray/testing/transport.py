"""The tests every transport passes: subclass :class:`TransportConformance`.  [SDK, daemon]

A transport's test module subclasses the suite and provides one fixture, ``transport``: an
instance with both halves working in the test process (the daemon half allocates, the SDK
half maps), closed and leak-checked by the fixture itself::

    class TestShm(TransportConformance):
        @pytest.fixture
        def transport(self, tmp_path): ...

Each test walks the path the way the SDK and the daemon do (plan the layout, allocate one
region per planned segment, map for write, fill, map for read, wrap one base per segment,
view the tensors) and checks bytes, not values, so every dtype must round-trip bit-exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import grpc
import pytest
import torch

from tensorcast_ray._dtypes import ITEMSIZE, torch_dtype
from tensorcast_ray._errors import (
    ArtifactError,
    DataLossError,
    InvalidArgumentError,
    NotFoundError,
)
from tensorcast_ray._layout import NO_SEGMENT, Columns, LayoutPlan, describe_tensors, plan_layout
from tensorcast_ray._transport import transport_class
from tensorcast_ray._transport.base import DEVICES, Capabilities, SegmentRef, Transport

__all__ = ["TransportConformance"]

#: shapes every dtype round-trips: 0-d, empty, one element, odd sizes, several dims.
SHAPES: tuple[tuple[int, ...], ...] = ((), (0,), (3, 0, 2), (1,), (7,), (5, 3), (2, 3, 4))
#: plan_layout's default alignment: every tensor starts at a multiple of it.
ALIGN = 256


def _dtypes() -> list[str]:
    names = []
    for name in sorted(ITEMSIZE):
        try:
            torch_dtype(name)
        except ArtifactError:
            continue  # not in this torch build
        names.append(name)
    return names


def _random(dtype: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes viewed as ``dtype``: every bit pattern, NaNs and odd bools included."""
    gen = torch.Generator().manual_seed(seed)
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(torch_dtype(dtype)).reshape(shape)


def _raw(t: torch.Tensor) -> bytes:
    return (
        t.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    )


def _code(exc: pytest.ExceptionInfo[Any], code: grpc.StatusCode) -> None:
    assert isinstance(exc.value, ArtifactError), type(exc.value)
    assert exc.value.status_code == code, exc.value


class TransportConformance:
    """The conformance tests; a subclass provides the ``transport`` fixture."""

    #: the segment size layouts are planned with (small: multi-segment artifacts are cheap).
    segment_bytes: ClassVar[int] = 64 * 1024

    @pytest.fixture
    def transport(self) -> Iterator[Transport]:
        raise NotImplementedError("subclass TransportConformance and provide this fixture")

    # ---- helpers -----------------------------------------------------------------------
    def put(
        self, transport: Transport, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[LayoutPlan, list[SegmentRef]]:
        """[daemon] allocate per planned segment, [SDK] map, fill, unmap: one write."""
        plan = plan_layout(describe_tensors(tensors), self.segment_bytes)
        refs = [transport.allocate(size) for size in plan.segment_sizes]
        regions = [transport.map_for_write(ref) for ref in refs]
        for meta in plan.tensors:
            if meta.segment != NO_SEGMENT:
                transport.fill(regions[meta.segment], tensors[meta.name], meta.offset)
        for region in regions:
            transport.unmap(region)
        return plan, refs

    def get(
        self, transport: Transport, plan: LayoutPlan, refs: list[SegmentRef]
    ) -> dict[str, torch.Tensor]:
        """[SDK] map for read, one base per segment, a slice per tensor: one read."""
        regions = [transport.map_for_read(ref) for ref in refs]
        bases = [transport.wrap_base(region) for region in regions]
        out = transport.tensors(bases, _columns(plan))
        for region in regions:
            transport.unmap(region)  # the tensors keep what they use mapped
        return out

    def round_trip(self, transport: Transport, tensors: Mapping[str, torch.Tensor]) -> None:
        plan, refs = self.put(transport, tensors)
        try:
            back = self.get(transport, plan, refs)
            assert list(back) == list(tensors)
            for name, src in tensors.items():
                got = back[name]
                assert got.dtype == src.dtype and got.shape == src.shape, name
                assert got.device.type == "cpu" or got.device.type in self.devices(transport)
                assert _raw(got.cpu()) == _raw(src.cpu()), f"{name}: bytes differ"
        finally:
            transport.free(refs)

    @staticmethod
    def devices(transport: Transport) -> frozenset[str]:
        return type(transport).capabilities.devices

    # ---- capabilities -------------------------------------------------------------------
    def test_capabilities_are_declared_and_registered(self, transport: Transport) -> None:
        caps = type(transport).capabilities
        assert isinstance(caps, Capabilities)
        assert caps.devices and caps.devices <= DEVICES
        assert transport_class(caps.name) is type(transport), "registered under its name"
        for flag in (caps.same_node_only, caps.one_sided, caps.zero_copy_reads):
            assert isinstance(flag, bool)

    def test_zero_copy_reads_see_the_transports_memory(self, transport: Transport) -> None:
        if not type(transport).capabilities.zero_copy_reads:
            pytest.skip("the transport copies on read")
        src = {"w": torch.zeros(64, dtype=torch.uint8)}
        plan, refs = self.put(transport, src)
        try:
            (got,) = self.get(transport, plan, refs).values()
            region = transport.map_for_write(refs[0])
            transport.fill(region, torch.full((64,), 7, dtype=torch.uint8), 0)
            transport.unmap(region)
            assert got.tolist() == [7] * 64, "a zero-copy read is over the memory itself"
        finally:
            transport.free(refs)

    # ---- round trips ---------------------------------------------------------------------
    @pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
    @pytest.mark.parametrize("dtype", _dtypes())
    def test_every_dtype_and_shape_round_trips_bit_exactly(
        self, transport: Transport, dtype: str
    ) -> None:
        tensors = {f"t{i}": _random(dtype, shape, i) for i, shape in enumerate(SHAPES)}
        self.round_trip(transport, tensors)

    def test_tensors_across_segments_and_larger_than_one(self, transport: Transport) -> None:
        big = self.segment_bytes + 12345
        tensors = {
            "a": _random("float32", (1000,), 1),
            "huge": _random("uint8", (big,), 2),
            "b": _random("bfloat16", (self.segment_bytes // 3,), 3),
            "c": _random("int64", (333,), 4),
            "d": _random("float16", (self.segment_bytes // 2 - 7,), 5),
        }
        plan = plan_layout(describe_tensors(tensors), self.segment_bytes)
        assert len(plan.segment_sizes) >= 3, "the case must span segments"
        self.round_trip(transport, tensors)

    def test_only_empty_tensors_need_no_region(self, transport: Transport) -> None:
        tensors = {"e": torch.empty(0), "f": torch.empty(2, 0, dtype=torch.int8)}
        plan, refs = self.put(transport, tensors)
        assert refs == []
        back = self.get(transport, plan, refs)
        assert back["f"].shape == (2, 0) and back["f"].dtype == torch.int8

    def test_non_contiguous_sources_are_stored_contiguous(self, transport: Transport) -> None:
        base = _random("float32", (6, 5), 9)
        tensors = {"t": base.t(), "s": base[::2, 1:], "neg": torch.tensor([1 + 2j]).conj()}
        self.round_trip(transport, tensors)

    def test_tensors_are_aligned(self, transport: Transport) -> None:
        tensors = {f"t{i}": _random("uint8", (1 + 37 * i,), i) for i in range(12)}
        plan, refs = self.put(transport, tensors)
        try:
            for name, got in self.get(transport, plan, refs).items():
                assert got.data_ptr() % ALIGN == 0, f"{name} at {got.data_ptr():#x}"
        finally:
            transport.free(refs)

    def test_allocations_are_fresh_and_large_enough(self, transport: Transport) -> None:
        refs = [transport.allocate(size) for size in (1, 4096, 5000, self.segment_bytes)]
        try:
            assert len({name for name, _ in refs}) == len(refs)
            for (_, size), asked in zip(refs, (1, 4096, 5000, self.segment_bytes), strict=True):
                assert size >= asked
            transport.free(refs[:1])
            again = transport.allocate(1)
            refs.append(again)
            assert again[0] != refs[0][0], "a freed region is never handed out again"
        finally:
            transport.free(refs)

    # ---- read-only reads and freeing ---------------------------------------------------------
    def test_reads_are_read_only(self, transport: Transport) -> None:
        ref = transport.allocate(4096)
        try:
            region = transport.map_for_read(ref)
            with pytest.raises(InvalidArgumentError) as err:
                transport.fill(region, torch.ones(8), 0)
            _code(err, grpc.StatusCode.INVALID_ARGUMENT)
            transport.unmap(region)
        finally:
            transport.free([ref])

    def test_a_freed_region_is_gone_but_mapped_bytes_stay(self, transport: Transport) -> None:
        src = {"w": _random("int32", (100,), 3)}
        plan, refs = self.put(transport, src)
        held = self.get(transport, plan, refs)
        transport.free(refs)
        transport.free(refs)  # idempotent
        with pytest.raises(NotFoundError) as err:
            transport.map_for_read(refs[0])
        _code(err, grpc.StatusCode.NOT_FOUND)
        assert _raw(held["w"]) == _raw(src["w"]), "a reader keeps the bytes it mapped"

    def test_unmap_while_tensors_live_keeps_them_valid(self, transport: Transport) -> None:
        src = {"w": _random("float64", (64,), 4)}
        plan, refs = self.put(transport, src)
        try:
            region = transport.map_for_read(refs[0])
            base = transport.wrap_base(region)
            t = transport.tensor([base], plan.tensors[0])
            del base
            transport.unmap(region)
            assert _raw(t) == _raw(src["w"])
        finally:
            transport.free(refs)

    # ---- errors ------------------------------------------------------------------------------
    @pytest.mark.parametrize("size", [0, -1, True, 1.5])
    def test_a_bad_allocation_size_is_invalid_argument(
        self, transport: Transport, size: Any
    ) -> None:
        with pytest.raises(InvalidArgumentError) as err:
            transport.allocate(size)
        _code(err, grpc.StatusCode.INVALID_ARGUMENT)

    def test_a_bad_segment_name_is_invalid_argument(self, transport: Transport) -> None:
        for name in ("../escape", "a/b", ""):
            with pytest.raises(InvalidArgumentError) as err:
                transport.map_for_read((name, 4096))
            _code(err, grpc.StatusCode.INVALID_ARGUMENT)

    def test_an_unknown_segment_is_not_found(self, transport: Transport) -> None:
        with pytest.raises(NotFoundError) as err:
            transport.map_for_read(("never-allocated", 4096))
        _code(err, grpc.StatusCode.NOT_FOUND)
        with pytest.raises(NotFoundError):
            transport.map_for_write(("never-allocated", 4096))

    def test_a_region_shorter_than_its_ref_is_data_loss(self, transport: Transport) -> None:
        name, size = transport.allocate(4096)
        try:
            with pytest.raises(DataLossError) as err:
                transport.map_for_read((name, size * 4))
            _code(err, grpc.StatusCode.DATA_LOSS)
        finally:
            transport.free([(name, size)])

    def test_a_tensor_past_the_region_is_refused(self, transport: Transport) -> None:
        ref = transport.allocate(4096)
        try:
            region = transport.map_for_write(ref)
            with pytest.raises(InvalidArgumentError) as err:
                transport.fill(region, torch.ones(2048, dtype=torch.uint8), ref[1] - 1024)
            _code(err, grpc.StatusCode.INVALID_ARGUMENT)
            transport.unmap(region)
        finally:
            transport.free([ref])

    def test_a_corrupt_manifest_is_data_loss(self, transport: Transport) -> None:
        src = {"w": _random("float32", (16,), 5)}
        plan, refs = self.put(transport, src)
        try:
            region = transport.map_for_read(refs[0])
            base = transport.wrap_base(region)
            meta = plan.tensors[0]
            for bad in (
                type(meta)(meta.name, meta.dtype, meta.shape, 5, meta.offset, meta.nbytes),
                type(meta)(meta.name, meta.dtype, meta.shape, 0, refs[0][1], meta.nbytes),
                type(meta)(meta.name, meta.dtype, (17,), 0, meta.offset, meta.nbytes),
                type(meta)(meta.name, meta.dtype, meta.shape, 0, meta.offset + 2, meta.nbytes),
            ):
                with pytest.raises(DataLossError) as err:
                    transport.tensor([base], bad)
                _code(err, grpc.StatusCode.DATA_LOSS)
            del base
            transport.unmap(region)
        finally:
            transport.free(refs)


def _columns(plan: LayoutPlan) -> Columns:
    """``plan`` as the read cache holds a layout: placed columns decoded from the wire."""
    metas = plan.tensors
    cols = Columns.of([m.name for m in metas], [m.dtype for m in metas], [m.shape for m in metas])
    sizes = plan.segment_sizes
    placed = cols.placed([m.segment for m in metas], [m.offset for m in metas], sizes)
    return Columns.from_table(placed.to_table(), sizes)
