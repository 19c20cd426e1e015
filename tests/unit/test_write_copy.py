"""The put copy loop: every kind of tensor lands byte-exact where the layout puts it.  [SDK]"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import pytest
import torch

from tensorcast_ray import _write
from tensorcast_ray._layout import describe, place


def _bytes(value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value).tobytes()
    t = value.detach().resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_every_kind_of_tensor_is_copied_to_its_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_write, "_INLINE_BYTES", 4096)  # small enough to use the copy threads
    monkeypatch.setattr(_write, "_CHUNK_BYTES", 8192)
    complex_ = torch.randn(8, dtype=torch.complex64)
    tensors: dict[str, Any] = {
        "contiguous": torch.randn(16, 16),
        "large": torch.arange(50_000, dtype=torch.int32),  # several chunks over the threads
        "strided": torch.randn(8, 8).t(),
        "conj": complex_.conj(),
        "neg_view": complex_.conj().imag,
        "grad": torch.randn(5, requires_grad=True),
        "numpy": np.arange(33, dtype=np.float64),
        "numpy_strided": np.arange(64, dtype=np.int16)[::2],
        "numpy_swapped": np.arange(9, dtype=">i4"),
        "empty": torch.zeros(0, 4),
        "bf16": torch.randn(7).to(torch.bfloat16),
    }
    cols = describe(tensors)
    segments, offsets, sizes = place(cols.nbytes, 64 * 1024)
    maps = [mmap.mmap(-1, size) for size in sizes]
    _write.copy_tensors(list(tensors.values()), cols, segments, offsets, maps)
    for (name, value), seg, off, nbytes in zip(
        tensors.items(), segments, offsets, cols.nbytes, strict=True
    ):
        if nbytes:
            expected = _bytes(value)
            if name == "numpy_swapped":  # stored native, as describe says
                expected = value.astype("=i4").tobytes()
            assert maps[seg][off : off + nbytes] == expected, name
    for m in maps:
        m.close()  # no export left behind by the copy
