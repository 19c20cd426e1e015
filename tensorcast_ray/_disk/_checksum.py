"""Checksums of the disk format: streaming CRC and the CRC of two concatenated runs.  [SDK, daemon]

The manifest names its algorithm (``"crc32c"`` when ``google_crc32c`` or ``crc32c`` is
importable, else ``"crc32"`` from :mod:`zlib`; both release the GIL on large buffers) and
stores every checksum as 8 lowercase hex digits.

:func:`combine` gives ``crc(a + b)`` from ``crc(a)``, ``crc(b)`` and ``len(b)`` (zlib's
``crc32_combine``, in pure Python, ~50 µs).  It lets readers checksum parts of a tensor in
parallel threads and still verify the tensor's and the shard's checksum, and lets writers
get a shard's checksum from its header's and tensors' checksums.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

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


def _crc32c_update() -> Callable[[int, memoryview | bytes], int] | None:
    try:
        google = importlib.import_module("google_crc32c")
        if getattr(google, "implementation", "c") == "c":
            extend = google.extend
            return lambda crc, data: int(extend(crc, data))
    except ImportError:
        pass
    try:
        crc32c = importlib.import_module("crc32c")
        fn = crc32c.crc32c
        return lambda crc, data: int(fn(data, crc))
    except ImportError:
        return None


def checksum_for(name: str) -> Checksum:
    """The algorithm a manifest names; fails with advice when its library is missing."""
    if name == "crc32":
        return Checksum("crc32", _zlib_update, _POLYS["crc32"])
    if name == "crc32c":
        update = _crc32c_update()
        if update is None:
            raise FailedPreconditionError(
                "this artifact was written with crc32c checksums; install google-crc32c "
                "(pip install google-crc32c) to verify it, or read it with verify=False"
            )
        return Checksum("crc32c", update, _POLYS["crc32c"])
    raise FailedPreconditionError(
        f"unknown checksum algorithm {name!r} in a manifest; upgrade tensorcast_ray "
        "or read it with verify=False"
    )


def default_checksum() -> Checksum:
    """crc32c when a fast C implementation is installed, else zlib's crc32."""
    return checksum_for("crc32c") if _crc32c_update() is not None else checksum_for("crc32")


def to_hex(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"
