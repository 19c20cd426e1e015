"""The safetensors container: build a shard header, parse any file's header.  [SDK, daemon]

A safetensors file is ``u64 little-endian N | N bytes of JSON | data``; the JSON maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data
start, plus an optional ``"__metadata__"`` string map.  We pad the JSON with spaces (as the
safetensors package does) so the data starts 8-byte aligned.

Dtypes the safetensors format lacks (complex, float8 ``*fnuz`` / ``e8m0fnu``) are stored as
``"U8"`` with shape ``[*shape, itemsize]`` — so any safetensors reader loads them as bytes —
and their real dtype goes to ``__metadata__["tensorcast.dtypes"]`` (a JSON object
``{name: dtype}``) and to the manifest.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tensorcast_ray._dtypes import ITEMSIZE, SAFETENSORS_NAME
from tensorcast_ray._errors import DataLossError, InvalidArgumentError

__all__ = ["HeaderTensor", "ParsedHeader", "build_header", "canonical_dtype", "parse_header"]

RAW_DTYPES_KEY = "tensorcast.dtypes"
MAX_HEADER_BYTES = 100 << 20  # the safetensors package's own limit
# Newer safetensors names that the writer table (SAFETENSORS_NAME) does not emit.
_EXTRA_READ_NAMES = {
    "C64": "complex64",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
_FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS_NAME.items()} | _EXTRA_READ_NAMES


@dataclass(frozen=True)
class HeaderTensor:
    """A tensor as a header names it; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str  # canonical
    shape: tuple[int, ...]
    stored_as: str
    begin: int
    end: int


@dataclass(frozen=True)
class ParsedHeader:
    header_size: int  # data starts here
    tensors: tuple[HeaderTensor, ...]  # in file order
    metadata: Mapping[str, str]

    @property
    def data_end(self) -> int:
        return max((t.end for t in self.tensors), default=self.header_size)


def stored_dtype(dtype: str, shape: tuple[int, ...]) -> tuple[str, list[int]]:
    """(safetensors dtype, shape) a canonical dtype is written as."""
    name = SAFETENSORS_NAME.get(dtype)
    if name is not None:
        return name, list(shape)
    return "U8", [*shape, ITEMSIZE[dtype]]


def build_header(
    tensors: Sequence[tuple[str, str, tuple[int, ...], int]], metadata: Mapping[str, str]
) -> bytes:
    """Header bytes (length prefix included) for ``(name, dtype, shape, nbytes)`` in order."""
    doc: dict[str, object] = {}
    raw: dict[str, str] = {}
    pos = 0
    for name, dtype, shape, nbytes in tensors:
        st_dtype, st_shape = stored_dtype(dtype, shape)
        if st_dtype == "U8" and dtype != "uint8":
            raw[name] = dtype
        doc[name] = {"dtype": st_dtype, "shape": st_shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    meta = dict(metadata)
    if raw:
        meta[RAW_DTYPES_KEY] = json.dumps(raw, sort_keys=True)
    body = json.dumps({"__metadata__": meta, **doc}, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body


def canonical_dtype(stored: str, where: str) -> str:
    try:
        return _FROM_SAFETENSORS[stored]
    except KeyError:
        raise InvalidArgumentError(
            f"{where}: safetensors dtype {stored!r} is not supported; supported: "
            f"{', '.join(sorted(_FROM_SAFETENSORS))}"
        ) from None


def header_length(prefix: bytes, where: str) -> int:
    if len(prefix) < 8:
        raise DataLossError(f"{where} is truncated (shorter than a safetensors header)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise DataLossError(f"{where}: header length {n} is not plausible; the file is corrupt")
    return int(n)


def parse_header(raw: bytes, where: str) -> ParsedHeader:
    """Parse ``raw`` = the first ``8 + N`` bytes of a safetensors file."""
    n = header_length(raw, where)
    if len(raw) < 8 + n:
        raise DataLossError(f"{where} is truncated inside its header")
    try:
        doc = json.loads(raw[8 : 8 + n])
        if not isinstance(doc, dict):
            raise ValueError("header is not a JSON object")
        meta = doc.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise ValueError("__metadata__ is not an object")
        raw_dtypes = json.loads(meta.get(RAW_DTYPES_KEY, "{}"))
        start = 8 + n
        out = []
        for name, info in doc.items():
            stored = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
            dtype = canonical_dtype(stored, f"{where} tensor {name!r}")
            if name in raw_dtypes and stored == "U8":  # a raw-stored dtype of ours
                dtype = raw_dtypes[name]
                if dtype not in ITEMSIZE or not shape or shape[-1] != ITEMSIZE[dtype]:
                    raise ValueError(f"tensor {name!r}: bad raw dtype record {dtype!r}")
                shape = shape[:-1]
            if min(shape, default=0) < 0 or not 0 <= b <= e:
                raise ValueError(f"tensor {name!r}: bad shape or offsets")
            if e - b != math.prod(shape) * ITEMSIZE[dtype]:
                raise ValueError(f"tensor {name!r}: offsets do not match dtype and shape")
            out.append(HeaderTensor(name, dtype, shape, stored, start + b, start + e))
    except (ValueError, TypeError, KeyError) as exc:
        raise DataLossError(f"{where}: invalid safetensors header ({exc})") from None
    out.sort(key=lambda t: (t.begin, t.end))
    return ParsedHeader(8 + n, tuple(out), {str(k): str(v) for k, v in meta.items()})
