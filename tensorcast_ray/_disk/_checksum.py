"""Checksums of the disk format: streaming CRC and the CRC of two concatenated runs.  [SDK, daemon]

The manifest names its algorithm and stores every checksum as 8 lowercase hex digits.  New
exports use ``"crc32c"`` through the ``crc32c`` package (a base dependency: SSE 4.2 / ARMv8
CRC instructions, ~0.075 s a GiB on one core here, any buffer including writable
memoryviews, no copy, the GIL released from 32 KiB on, so shards checksum in parallel
threads); where that package only has its software fallback (no CPU support) they use
``"crc32"`` from :mod:`zlib` (~0.26 s a GiB here, also GIL-free), which is no slower there.
Either algorithm verifies on read whatever the machine, so exports written with zlib's
``crc32`` (every export before ``crc32c`` became a dependency) keep verifying.

:func:`combine` gives ``crc(a + b)`` from ``crc(a)``, ``crc(b)`` and ``len(b)`` (zlib's
``crc32_combine``, in pure Python, ~50 µs).  It lets readers checksum parts of a tensor in
parallel threads and still verify the tensor's and the shard's checksum, and lets writers
get a shard's checksum from its header's and tensors' checksums.
"""

from __future__ import annotations

import functools
import importlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tensorcast_ray._errors import FailedPreconditionError

__all__ = ["Checksum", "checksum_for", "default_checksum", "to_hex"]

_POLYS = {"crc32": 0xEDB88320, "crc32c": 0x82F63B78}  # reflected polynomials


def _multmodp(a: int, b: int, poly: int) -> int:
    """a * b modulo the CRC polynomial (bit-reflected, as zlib)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ poly if b & 1 else b >> 1
    return p


@functools.cache
def _x2n_table(poly: int) -> tuple[int, ...]:
    p = 1 << 30  # x^1
    table = [p]
    for _ in range(31):
        p = _multmodp(p, p, poly)
        table.append(p)
    return tuple(table)


@dataclass(frozen=True)
class Checksum:
    """One CRC algorithm: ``update(crc, data)`` streams, ``combine`` joins runs."""

    name: str
    update: Callable[[int, memoryview | bytes], int]
    poly: int
    _table: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_table", _x2n_table(self.poly))

    def combine(self, crc1: int, crc2: int, len2: int) -> int:
        """``crc(a + b)`` given ``crc(a)``, ``crc(b)`` and ``len(b)``."""
        p = 1 << 31  # x^0
        n, k = len2, 3  # x^(8 * len2)
        while n:
            if n & 1:
                p = _multmodp(self._table[k & 31], p, self.poly)
            n >>= 1
            k += 1
        return _multmodp(p, crc1, self.poly) ^ crc2

    def of(self, data: memoryview | bytes) -> int:
        return self.update(0, data)


def _zlib_update(crc: int, data: memoryview | bytes) -> int:
    return zlib.crc32(data, crc)


def _crc32c_module() -> Any | None:
    """The ``crc32c`` package, or None.  (``google_crc32c`` is not used: its ``extend`` takes
    only ``bytes``-like objects without a release hook, so every memoryview of shared memory
    would need a copy first.)"""
    try:
        return importlib.import_module("crc32c")
    except ImportError:
        return None


def _crc32c_update() -> Callable[[int, memoryview | bytes], int] | None:
    mod = _crc32c_module()
    if mod is None:
        return None
    fn = mod.crc32c  # crc32c(data, value=0): any buffer, GIL released from 32 KiB

    def update(crc: int, data: memoryview | bytes) -> int:
        return int(fn(data, crc))

    return update


def checksum_for(name: str) -> Checksum:
    """The algorithm a manifest names; fails with advice when its library is missing."""
    if name == "crc32":
        return Checksum("crc32", _zlib_update, _POLYS["crc32"])
    if name == "crc32c":
        update = _crc32c_update()
        if update is None:
            raise FailedPreconditionError(
                "this artifact was written with crc32c checksums; install the crc32c package "
                "(pip install crc32c, a dependency of tensorcast_ray) to verify it, or read "
                "it with verify=False"
            )
        return Checksum("crc32c", update, _POLYS["crc32c"])
    raise FailedPreconditionError(
        f"unknown checksum algorithm {name!r} in a manifest; upgrade tensorcast_ray "
        "or read it with verify=False"
    )


def default_checksum() -> Checksum:
    """What a new export uses: crc32c where the CPU computes it (``crc32c.hardware_based``),
    else zlib's crc32 (faster than crc32c in software)."""
    mod = _crc32c_module()
    if mod is not None and getattr(mod, "hardware_based", False):
        return checksum_for("crc32c")
    return checksum_for("crc32")


def to_hex(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"
