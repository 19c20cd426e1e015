"""Layout planning, byte copies, zero-copy wrapping and view slicing (no Ray)."""

from __future__ import annotations

import json
import mmap
import random
import tempfile
import uuid
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from tensorcast_ray._dtypes import ITEMSIZE
from tensorcast_ray._errors import DataLossError, InvalidArgumentError
from tensorcast_ray._layout import (
    NO_SEGMENT,
    LayoutPlan,
    TensorMeta,
    copy_into,
    describe_tensors,
    normalize_slices,
    plan_layout,
    slice_region,
    wrap_tensor,
)

ALL_DTYPES = sorted(n for n in ITEMSIZE if isinstance(getattr(torch, n, None), torch.dtype))


def _random_tensor(dtype_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs included) of ``dtype``, so equality is checked bitwise."""
    dtype = getattr(torch, dtype_name)
    n = int(np.prod(shape)) * ITEMSIZE[dtype_name]
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2  # only 0/1 are valid bools
    return raw.view(dtype).reshape(shape)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _round_trip(t: Any, *, offset: int = 256, read_only: bool = True) -> torch.Tensor:
    [(name, dtype, shape)] = describe_tensors({"t": t})
    plan = plan_layout([(name, dtype, shape)], segment_bytes=1 << 20)
    meta = plan.tensors[0]
    buf = bytearray(offset + max(meta.nbytes, 1))
    copy_into(t, buf, offset)
    view: Any = memoryview(bytes(buf)) if read_only else buf
    with warnings.catch_warnings():
        # wrap_tensor must not leak torch's read-only-buffer warning to the caller.
        warnings.filterwarnings("error", message=".*not writable.*")
        return wrap_tensor(view, meta, base_offset=offset)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype_name", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (7, 5)])
def test_every_dtype_round_trips_bit_exactly(dtype_name: str, shape: tuple[int, ...]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # complex32 is "experimental"
        t = _random_tensor(dtype_name, shape)
    out = _round_trip(t)
    assert out.dtype == t.dtype and tuple(out.shape) == shape
    assert torch.equal(_bytes(out), _bytes(t))


def test_wrap_is_zero_copy() -> None:
    buf = bytearray(4096)
    meta = TensorMeta("w", "float32", (4, 2), 0, 512, 32)
    t = wrap_tensor(buf, meta)
    buf[512:516] = np.float32(3.5).tobytes()
    assert t[0, 0].item() == 3.5  # the tensor sees the buffer, not a copy of it


def test_non_contiguous_inputs_are_stored_contiguous() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    for t in (base.t(), base[:, ::2], base[1:3, 2:5].t()):
        assert not t.is_contiguous()
        out = _round_trip(t)
        assert out.is_contiguous() and torch.equal(out, t)


def test_conj_neg_and_grad_views_store_their_values() -> None:
    c = torch.randn(5, dtype=torch.complex64)
    assert torch.equal(_round_trip(c.conj()), c.conj().resolve_conj())
    assert torch.equal(_round_trip(c.conj().imag), c.conj().imag.resolve_neg())
    g = torch.randn(3, requires_grad=True)
    assert torch.equal(_round_trip(g), g.detach())


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([True, False, True]),
        np.arange(6, dtype=np.float16),
        np.arange(10, dtype=np.int64)[::-1],  # negative stride
        np.arange(12, dtype=np.uint16).reshape(3, 4).T,  # non-contiguous
        np.arange(4, dtype=">f4"),  # foreign byte order, stored native
        np.zeros((0, 3), dtype=np.complex128),
    ],
)
def test_numpy_inputs(arr: np.ndarray) -> None:
    out = _round_trip(arr)
    assert np.array_equal(out.numpy(), arr)


def test_numpy_dtype_torch_lacks() -> None:
    with pytest.raises(InvalidArgumentError):
        copy_into(np.array(["a"], dtype=object), bytearray(64), 0)
    with pytest.raises(InvalidArgumentError, match="'s'"):
        describe_tensors({"s": np.array(["abc"])})


def test_describe_tensors() -> None:
    specs = describe_tensors(
        {
            "a": torch.zeros(2, 3, dtype=torch.bfloat16),
            "b": np.zeros((4,), dtype=np.int8),
            "c": torch.empty(5, 6, device="meta", dtype=torch.float8_e4m3fn),  # any device
            "d": torch.tensor(1.0),
        }
    )
    assert specs == [
        ("a", "bfloat16", (2, 3)),
        ("b", "int8", (4,)),
        ("c", "float8_e4m3fn", (5, 6)),
        ("d", "float32", ()),
    ]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (lambda: {"w": [1, 2]}, "'w'.*list"),
        (lambda: {1: torch.zeros(1)}, "names must be str"),
        (lambda: {"q": torch.empty(2, dtype=torch.float4_e2m1fn_x2)}, "'q'.*not supported"),
        (lambda: {"s": torch.zeros(2, 2).to_sparse()}, "'s'.*to_dense"),
        (lambda: [torch.zeros(1)], "mapping"),
    ],
)
def test_describe_tensors_rejects(value: Any, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        describe_tensors(value())


def test_copy_into_rejects_bad_destinations() -> None:
    t = torch.zeros(16, dtype=torch.float32)
    with pytest.raises(InvalidArgumentError, match="do not fit"):
        copy_into(t, bytearray(64), 8)
    with pytest.raises(InvalidArgumentError, match="writable"):
        copy_into(t, memoryview(bytes(64)), 0)
    with pytest.raises(InvalidArgumentError):
        copy_into(torch.empty(2, device="meta"), bytearray(64), 0)
    with pytest.raises(InvalidArgumentError):
        copy_into("not a tensor", bytearray(64), 0)


def test_wrap_tensor_rejects_bad_metadata() -> None:
    with pytest.raises(InvalidArgumentError, match="do not fit"):
        wrap_tensor(bytearray(64), TensorMeta("w", "float32", (16,), 0, 8, 64))
    with pytest.raises(DataLossError, match="corrupt"):
        wrap_tensor(bytearray(64), TensorMeta("w", "float32", (16,), 0, 0, 60))


def test_wrapped_mmap_stays_mapped_while_tensor_lives() -> None:
    with tempfile.TemporaryFile() as f:
        f.truncate(4096)
        m = mmap.mmap(f.fileno(), 4096)
        meta = TensorMeta("w", "int32", (4,), 0, 0, 16)
        copy_into(torch.arange(4, dtype=torch.int32), m, 0)
        t = wrap_tensor(m, meta)
        with pytest.raises(BufferError):
            m.close()  # cannot unmap under a live tensor
        assert t.tolist() == [0, 1, 2, 3]
        del t
        m.close()


def test_plan_layout_packs_aligns_and_isolates_oversize() -> None:
    plan = plan_layout(
        [
            ("a", "float32", (10,)),  # 40 B at 0
            ("b", "uint8", (1,)),  # at 256
            ("empty", "float64", (0, 4)),  # no bytes
            ("big", "uint8", (5000,)),  # > segment_bytes: own segment
            ("c", "int64", (80,)),  # 640 B: does not fit after b (512 + 640) -> new segment
            ("d", "int8", (3,)),  # packs after c, 256-aligned
        ],
        segment_bytes=1024,
    )
    got = {t.name: (t.segment, t.offset, t.nbytes) for t in plan.tensors}
    assert got == {
        "a": (0, 0, 40),
        "b": (0, 256, 1),
        "empty": (NO_SEGMENT, 0, 0),
        "big": (1, 0, 5000),
        "c": (2, 0, 640),
        "d": (2, 768, 3),
    }
    assert plan.segment_sizes == (4096, 8192, 4096)
    assert all(t.offset % 256 == 0 for t in plan.tensors)
    assert plan.total_bytes == 16384


def test_plan_layout_fills_segments_exactly() -> None:
    plan = plan_layout([(f"t{i}", "uint8", (256,)) for i in range(9)], segment_bytes=1024)
    assert [(t.segment, t.offset) for t in plan.tensors] == [
        (0, 0), (0, 256), (0, 512), (0, 768), (1, 0), (1, 256), (1, 512), (1, 768), (2, 0)
    ]  # fmt: skip
    assert plan_layout([], segment_bytes=1024) == LayoutPlan((), ())
    only_empty = plan_layout([("e", "bool", (0,))], segment_bytes=1024)
    assert only_empty.segment_sizes == () and only_empty.tensors[0].segment == NO_SEGMENT


@pytest.mark.parametrize(
    ("specs", "kwargs", "match"),
    [
        ([("", "uint8", (1,))], {}, "non-empty"),
        ([("a", "uint8", (1,)), ("a", "uint8", (1,))], {}, "'a' appears twice"),
        ([("x", "float33", (1,))], {}, "tensor 'x'.*float33"),
        ([("x", "uint8", (-1,))], {}, "tensor 'x'.*non-negative"),
        ([("x", "uint8", (True,))], {}, "tensor 'x'"),
        ([("x", "uint8", (1.0,))], {}, "tensor 'x'"),
        ([("x", "uint8")], {}, r"\(name, dtype, shape\)"),
        ([], {"align": 3}, "power of two"),
        ([], {"segment_bytes": 0}, "segment_bytes"),
    ],
)
def test_plan_layout_validates(specs: Any, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        plan_layout(specs, **{"segment_bytes": 1024, **kwargs})


def test_plan_round_trips_through_json() -> None:
    plan = plan_layout(
        [("a", "bfloat16", (3, 4)), ("b", "bool", ()), ("z", "int8", (0,))], segment_bytes=4096
    )
    again = LayoutPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan


def _meta_dict(segment: int = 0, offset: int = 0, nbytes: int = 16) -> dict[str, Any]:
    return TensorMeta("a", "int32", (4,), segment, offset, nbytes).to_dict()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"tensors": []}, InvalidArgumentError),
        ({"tensors": [{"name": "a"}], "segment_sizes": []}, InvalidArgumentError),
        (
            {"tensors": [_meta_dict(nbytes=12)], "segment_sizes": [4096]},
            DataLossError,
        ),
        (
            {"tensors": [_meta_dict(segment=1)], "segment_sizes": [4096]},
            DataLossError,
        ),
        (
            {"tensors": [_meta_dict(offset=4090)], "segment_sizes": [4096]},
            DataLossError,
        ),
    ],
)  # fmt: skip
def test_plan_from_dict_rejects_corrupt(data: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        LayoutPlan.from_dict(data)


META = TensorMeta("w", "float32", (4, 6), 0, 1024, 96)


@pytest.mark.parametrize(
    ("spec", "norm", "contiguous", "offset", "nbytes", "shape"),
    [
        ((), ((0, 4, 1), (0, 6, 1)), True, 1024, 96, (4, 6)),
        (slice(1, 3), ((1, 3, 1), (0, 6, 1)), True, 1024 + 24, 48, (2, 6)),
        ((slice(-2, None),), ((2, 4, 1), (0, 6, 1)), True, 1024 + 48, 48, (2, 6)),
        ((slice(2, 3), slice(1, 4)), ((2, 3, 1), (1, 4, 1)), True, 1024 + 52, 12, (1, 3)),
        ([(1, slice(0, 3))], ((0, 4, 1), (0, 3, 1)), False, 1024, 84, (4, 3)),
        ([(-1, slice(5, 6))], ((0, 4, 1), (5, 6, 1)), False, 1044, 76, (4, 1)),
        ((slice(0, 4, 2),), ((0, 4, 2), (0, 6, 1)), False, 1024, 72, (2, 6)),
        ((slice(1, 2, 5),), ((1, 2, 5), (0, 6, 1)), True, 1048, 24, (1, 6)),
        ((slice(3, 3),), ((3, 3, 1), (0, 6, 1)), True, 1024 + 72, 0, (0, 6)),
        ((slice(4, 4),), ((4, 4, 1), (0, 6, 1)), True, 1024 + 96, 0, (0, 6)),
    ],
)
def test_slice_table(
    spec: Any,
    norm: tuple[tuple[int, int, int], ...],
    contiguous: bool,
    offset: int,
    nbytes: int,
    shape: tuple[int, ...],
) -> None:
    assert normalize_slices(META, spec) == tuple(slice(*n) for n in norm)
    region = slice_region(META, spec)
    assert (region.contiguous, region.offset, region.nbytes, region.shape) == (
        contiguous,
        offset,
        nbytes,
        shape,
    )


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ((slice(0, 5),), "dim 0 \\(size 4\\)"),
        ((slice(None), slice(0, 7)), "dim 1 \\(size 6\\)"),
        ((slice(-5, None),), "dim 0 \\(size 4\\)"),
        ((slice(3, 1),), "start 3 is after stop 1"),
        ((slice(0, 4, 0),), "step must be positive"),
        ((slice(0, 4, -1),), "step must be positive"),
        ((slice(None), slice(None), slice(None)), "has 2 dims"),
        ([(2, slice(None))], "dim 2 is out of range"),
        ([(0, slice(None)), (-2, slice(0, 1))], "dim 0 is sliced twice"),
        ([(0, 1)], "expected a slice"),
        ((1,), "expected a slice"),
        ([slice(0, 1)], r"\(dim, slice\) pairs"),
        ((slice(0.5, 2),), "ints or None"),
        ("0:2", "tuple of slices"),
    ],
)
def test_slice_errors_name_tensor_dim_and_size(spec: Any, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match) as info:
        normalize_slices(META, spec)
    assert "'w'" in info.value.message


def test_zero_dim_tensor_slices() -> None:
    scalar = TensorMeta("s", "int64", (), 0, 0, 8)
    assert normalize_slices(scalar, ()) == ()
    assert slice_region(scalar, ()) == type(slice_region(scalar, ()))(True, 0, 8, ())
    with pytest.raises(InvalidArgumentError):
        normalize_slices(scalar, (slice(None),))


def test_slice_region_agrees_with_torch_indexing() -> None:
    """Random selections: contiguity, offsets and bytes match what torch's indexing gives."""
    rng = random.Random(1234)
    shape = (3, 4, 5)
    meta = TensorMeta("x", "int16", shape, 0, 512, 120)
    full = torch.arange(60, dtype=torch.int16).reshape(shape)
    buf = bytearray(512 + 120)
    copy_into(full, buf, 512)
    for _ in range(400):
        spec = []
        for size in shape[: rng.randint(0, 3)]:
            start = rng.randint(0, size)
            stop = rng.randint(start, size)
            spec.append(slice(start, stop, rng.choice([None, 1, 1, 2, 3])))
        norm = normalize_slices(meta, tuple(spec))
        expect = full[norm]
        region = slice_region(meta, tuple(spec))
        assert region.shape == tuple(expect.shape)
        assert region.contiguous == expect.is_contiguous(), spec
        if expect.numel():
            assert region.offset == 512 + expect.storage_offset() * 2
        if region.contiguous:
            sub = TensorMeta("x", "int16", region.shape, 0, region.offset, region.nbytes)
            assert torch.equal(wrap_tensor(buf, sub), expect)
        else:
            window = TensorMeta(
                "x", "int16", (region.nbytes // 2,), 0, region.offset, region.nbytes
            )
            flat = wrap_tensor(buf, window)
            assert flat[0] == expect.reshape(-1)[0] and flat[-1] == expect.reshape(-1)[-1]


def test_end_to_end_through_a_shared_memory_segment() -> None:
    """put: plan, take a segment, map writable, copy; get: map read-only, wrap, no copy."""
    from tensorcast_ray._shm import Segment, list_segments, map_segment, new_segment_name

    shm, prefix = "/dev/shm", f"tcr-test-{uuid.uuid4().hex[:12]}-"
    state = {
        "w": torch.randn(64, 32).to(torch.bfloat16),
        "b": torch.arange(7),
        "s": torch.tensor(2),
    }
    plan = plan_layout(describe_tensors(state), segment_bytes=8192)
    segs = [Segment.create(shm, new_segment_name(prefix), n) for n in plan.segment_sizes]
    try:
        for i, seg in enumerate(segs):
            with map_segment(shm, seg.name, seg.size, writable=True) as m:
                for meta in plan.tensors:
                    if meta.segment == i:
                        copy_into(state[meta.name], m, meta.offset)
        maps = [map_segment(shm, s.name, s.size, writable=False, populate=False) for s in segs]
        got = {t.name: wrap_tensor(maps[t.segment], t) for t in plan.tensors}
        assert all(torch.equal(got[k], v) for k, v in state.items())
        with pytest.raises(BufferError):
            maps[plan.tensors[0].segment].close()  # live tensors keep it mapped
        del got
        for m in maps:
            m.close()
    finally:
        for seg in segs:
            seg.unlink()
    assert list_segments(shm, prefix) == []


# ---- the wire's tensor table ----------------------------------------------------------------
def test_columns_round_trip_through_the_table() -> None:
    from tensorcast_ray._layout import Columns, place

    specs = [("a.weight", "bfloat16", (3, 5)), ("b", "float32", ()), ("c", "bool", (0, 4))]
    specs += [(f"layer.{i}", "int8", (i + 1,)) for i in range(50)]
    cols = Columns.of([s[0] for s in specs], [s[1] for s in specs], [s[2] for s in specs])
    back = Columns.from_table(cols.to_table())
    assert back == cols and back.nbytes[:3] == [30, 4, 0]
    segments, offsets, sizes = place(cols.nbytes, 4096)
    placed = cols.placed(segments, offsets, sizes)
    assert Columns.from_table(placed.to_table(), sizes) == placed
    plan = plan_layout(specs, 4096)
    assert [(t.segment, t.offset) for t in plan.tensors] == [
        (seg, off) for seg, off in zip(segments, offsets, strict=True)
    ]
    assert placed.meta(0) == plan.tensors[0]


def test_tensor_table_rejects_malformed_input() -> None:
    from tensorcast_ray._layout import Columns
    from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2

    good = Columns.of(["a", "b"], ["float32", "int8"], [(2,), (3, 1)]).to_table()

    def broken(**changes: Any) -> common_pb2.TensorTable:
        table = common_pb2.TensorTable()
        table.CopyFrom(good)
        for field_name, value in changes.items():
            table.ClearField(field_name)
            if isinstance(value, bytes):
                setattr(table, field_name, value)
            else:
                getattr(table, field_name).extend(value)
        return table

    for table, match in (
        (broken(names=b"a"), "do not describe the same tensors"),
        (broken(ndim=[1]), "do not describe the same tensors"),
        (broken(dims=[2, 3]), "do not describe the same tensors"),
        (broken(dtype_index=[0, 5]), "dtype index"),
        (broken(dims=[2, -3, 1]), "negative"),
        (broken(names=b"a\x00a"), "appears twice"),
        (broken(names=b"\xff\x00b"), "UTF-8"),
        (broken(dtypes=["float32", "float99"]), "unknown dtype"),
        (broken(segment=[0, 0], offset=[0, 8]), "must not place"),
    ):
        with pytest.raises(InvalidArgumentError, match=match):
            Columns.from_table(table)
    with pytest.raises(InvalidArgumentError, match="NUL"):
        Columns.of(["a\x00b"], ["uint8"], [(1,)]).to_table()
    cols = Columns.of(["a", "b"], ["float32", "int8"], [(2,), (3, 1)])
    with pytest.raises(DataLossError, match="outside its segment"):
        Columns.from_table(cols.placed([0, 0], [0, 8], [4096]).to_table(), [8])
    with pytest.raises(DataLossError, match="places 1 of 2"):
        cols.placed([0], [0], [4096])


def test_read_only_buffers_silence_torch_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """``warnings.catch_warnings`` swaps process-wide state: wrapping must not run it per
    tensor (nor per segment) once torch's one-time warning is out of the way."""
    from tensorcast_ray import _layout

    ro = mmap.mmap(-1, 4096, prot=mmap.PROT_READ)
    _layout.bytes_tensor(ro)  # the first read-only wrap of this process (or not)

    def forbidden() -> None:
        raise AssertionError("catch_warnings ran again")

    monkeypatch.setattr(warnings, "catch_warnings", forbidden)
    saved = warnings.filters[:]
    warnings.simplefilter("error")  # and torch warns no more
    try:
        for _ in range(3):
            assert _layout.bytes_tensor(ro).numel() == 4096
            assert wrap_tensor(ro, TensorMeta("t", "float32", (4,), 0, 16, 16)).shape == (4,)
    finally:
        warnings.filters[:] = saved
