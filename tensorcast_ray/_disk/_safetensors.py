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
from tensorcast_ray._errors import ArtifactError, DataLossError, InvalidArgumentError

__all__ = ["HeaderTensor", "ParsedHeader", "build_header", "canonical_dtype", "parse_header"]

RAW_DTYPES_KEY = "tensorcast.dtypes"
MAX_HEADER_BYTES = 100 << 20  # the safetensors package's own limit
#: bounds on what a header may declare: more dims than torch supports, or a name longer than
#: any real checkpoint uses, is a corrupt or hostile file.
MAX_DIMS = 64
MAX_NAME_CHARS = 4096
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


def _int(value: object, what: str) -> int:
    # bool is an int subclass and JSON floats like 3.7 must never be truncated into offsets.
    if type(value) is not int:
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return value


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k[:MAX_NAME_CHARS]!r} appears twice")
        out[k] = v
    return out


def _entry(
    name: str, info: object, raw_dtypes: Mapping[str, object]
) -> tuple[str, tuple[int, ...], int, int]:
    """(canonical dtype, shape, begin, end) of one header entry, checked strictly."""
    if not name or len(name) > MAX_NAME_CHARS or "\x00" in name:
        raise ValueError(
            f"tensor name {name[:80]!r} must be 1..{MAX_NAME_CHARS} characters without NUL"
        )
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r}: entry is not an object")
    stored = info.get("dtype")
    if not isinstance(stored, str):
        raise ValueError(f"tensor {name!r}: field 'dtype' must be a string, got {stored!r}")
    shape_raw = info.get("shape")
    if not isinstance(shape_raw, list) or len(shape_raw) > MAX_DIMS:
        raise ValueError(
            f"tensor {name!r}: field 'shape' must be a list of at most {MAX_DIMS} ints"
        )
    shape = tuple(_int(d, f"tensor {name!r}: field 'shape' entry") for d in shape_raw)
    if min(shape, default=0) < 0:
        raise ValueError(f"tensor {name!r}: field 'shape' has a negative dimension")
    offsets = info.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise ValueError(f"tensor {name!r}: field 'data_offsets' must be [begin, end]")
    b, e = (_int(x, f"tensor {name!r}: field 'data_offsets' entry") for x in offsets)
    if not 0 <= b <= e:
        raise ValueError(f"tensor {name!r}: field 'data_offsets' [{b}, {e}] is not a range")
    dtype = canonical_dtype(stored, f"tensor {name!r}")
    if name in raw_dtypes and stored == "U8":  # a raw-stored dtype of ours
        raw = raw_dtypes[name]
        if (
            not isinstance(raw, str)
            or raw not in ITEMSIZE
            or not shape
            or shape[-1] != ITEMSIZE[raw]
        ):
            raise ValueError(f"tensor {name!r}: bad raw dtype record {raw!r}")
        dtype, shape = raw, shape[:-1]
    if e - b != math.prod(shape) * ITEMSIZE[dtype]:
        raise ValueError(
            f"tensor {name!r}: field 'data_offsets' spans {e - b} bytes, dtype and shape "
            f"need {math.prod(shape) * ITEMSIZE[dtype]}"
        )
    return dtype, shape, b, e


def parse_header(raw: bytes, where: str) -> ParsedHeader:
    """Parse ``raw`` = the first ``8 + N`` bytes of a safetensors file, strictly.

    As the safetensors package itself requires: integer shapes and offsets only (no
    floats, bools or strings), tensors laid end to end from the data start with no gap and
    no overlap, no duplicate names; dims and names are bounded.  Anything else is
    DataLossError naming the tensor and field, before a byte of data is read.
    """
    n = header_length(raw, where)
    if len(raw) < 8 + n:
        raise DataLossError(f"{where} is truncated inside its header")
    try:
        doc = json.loads(raw[8 : 8 + n], object_pairs_hook=_no_duplicates)
        if not isinstance(doc, dict):
            raise ValueError("header is not a JSON object")
        meta = doc.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ must map strings to strings")
        raw_dtypes = json.loads(meta.get(RAW_DTYPES_KEY, "{}"))
        if not isinstance(raw_dtypes, dict):
            raise ValueError(f"__metadata__[{RAW_DTYPES_KEY!r}] is not an object")
        start = 8 + n
        out = []
        for name, info in doc.items():
            dtype, shape, b, e = _entry(name, info, raw_dtypes)
            out.append(HeaderTensor(name, dtype, shape, info["dtype"], start + b, start + e))
        out.sort(key=lambda t: (t.begin, t.end))
        pos = start
        for t in out:
            if t.begin != pos:
                how = "overlaps" if t.begin < pos else "leaves a gap after"
                raise ValueError(
                    f"tensor {t.name!r}: field 'data_offsets' starts at {t.begin - start}, "
                    f"expected {pos - start} ({how} the tensor before it)"
                )
            pos = t.end
    except ArtifactError as exc:  # an unsupported dtype: the file is fine, we cannot load it
        raise type(exc)(f"{where}: {exc.message}") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise DataLossError(f"{where}: invalid safetensors header ({exc})") from None
    return ParsedHeader(8 + n, tuple(out), dict(meta))
