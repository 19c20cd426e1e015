"""The manifest: the one file that makes an artifact directory trustworthy.  [SDK, daemon]

Written last, atomically; a directory without a valid one holds no artifact.  Fields are
described in docs/disk-format.md.  Parsing validates every field and turns anything wrong
into :class:`DataLossError` (the bytes on disk are not what a writer wrote), so readers
never act on a half-understood manifest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tensorcast_ray._dtypes import ITEMSIZE
from tensorcast_ray._errors import DataLossError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Manifest", "ManifestShard", "ManifestTensor"]

FORMAT_NAME = "tensorcast-disk"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ManifestTensor:
    """One tensor: its bytes are ``[offset, offset + nbytes)`` of shard file ``shard``."""

    name: str
    dtype: str  # canonical name (tensorcast_ray._dtypes)
    shape: tuple[int, ...]
    shard: int
    offset: int  # absolute byte offset in the shard file
    nbytes: int
    checksum: str  # 8 hex digits, algorithm in Manifest.checksum_algorithm
    stored_as: str  # the safetensors dtype in the shard header ("U8" for raw-stored dtypes)

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class ManifestShard:
    """One safetensors file of the artifact."""

    file: str  # name inside the artifact directory
    size: int  # bytes of the whole file
    checksum: str  # of the whole file
    header_size: int  # 8 + header JSON length (padded); tensor data starts here
    header_checksum: str  # of bytes [0, header_size)


@dataclass(frozen=True)
class Manifest:
    """A committed artifact version on shared disk."""

    format_version: int
    artifact_id: str
    key: str
    created_at: float  # unix seconds
    checksum_algorithm: str
    shards: tuple[ManifestShard, ...]
    tensors: tuple[ManifestTensor, ...]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def tensor(self, name: str) -> ManifestTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        from tensorcast_ray._errors import NotFoundError

        raise NotFoundError(f"artifact {self.key!r} has no tensor {name!r}")

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "artifact_id": self.artifact_id,
            "key": self.key,
            "created_at": self.created_at,
            "checksum_algorithm": self.checksum_algorithm,
            "total_bytes": self.total_bytes,
            "shards": [vars(s) for s in self.shards],
            "tensors": [{**vars(t), "shape": list(t.shape)} for t in self.tensors],
        }
        return json.dumps(doc, indent=1, ensure_ascii=True).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        """Parse and validate; any defect raises DataLossError naming ``where``."""
        try:
            doc = json.loads(raw)
            return _parse(doc)
        except DataLossError as exc:
            raise DataLossError(f"{where}: {exc.message}; re-export the artifact") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataLossError(
                f"{where} is not a valid manifest ({type(exc).__name__}: {exc}); "
                "re-export the artifact"
            ) from None


def _get(doc: Mapping[str, Any], field: str, kind: type) -> Any:
    value = doc[field]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise DataLossError(f"field {field!r} must be an integer, got {value!r}")
    if kind is float and not isinstance(value, int | float):
        raise DataLossError(f"field {field!r} must be a number, got {value!r}")
    if kind in (str, list, dict) and not isinstance(value, kind):
        raise DataLossError(f"field {field!r} must be a {kind.__name__}, got {value!r}")
    return value


def _hex(doc: Mapping[str, Any], field: str) -> str:
    value = _get(doc, field, str)
    if len(value) != 8 or any(c not in "0123456789abcdef" for c in value):
        raise DataLossError(f"field {field!r} must be 8 hex digits, got {value!r}")
    return str(value)


def _parse(doc: Any) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise DataLossError(f"not a {FORMAT_NAME} manifest")
    version = _get(doc, "format_version", int)
    if version != FORMAT_VERSION:
        raise DataLossError(f"format_version {version} is not readable by this tensorcast_ray")
    shards = tuple(
        ManifestShard(
            file=_get(s, "file", str),
            size=_get(s, "size", int),
            checksum=_hex(s, "checksum"),
            header_size=_get(s, "header_size", int),
            header_checksum=_hex(s, "header_checksum"),
        )
        for s in _get(doc, "shards", list)
    )
    for s in shards:
        if "/" in s.file or s.file in ("", ".", "..") or not 8 <= s.header_size <= s.size:
            raise DataLossError(f"shard entry {s.file!r} is invalid")
    tensors = tuple(
        ManifestTensor(
            name=_get(t, "name", str),
            dtype=_get(t, "dtype", str),
            shape=tuple(_get(t, "shape", list)),
            shard=_get(t, "shard", int),
            offset=_get(t, "offset", int),
            nbytes=_get(t, "nbytes", int),
            checksum=_hex(t, "checksum"),
            stored_as=_get(t, "stored_as", str),
        )
        for t in _get(doc, "tensors", list)
    )
    seen: set[str] = set()
    for t in tensors:
        if t.dtype not in ITEMSIZE:
            raise DataLossError(f"tensor {t.name!r} has unknown dtype {t.dtype!r}")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in t.shape):
            raise DataLossError(f"tensor {t.name!r} has invalid shape {list(t.shape)}")
        if t.nbytes != math.prod(t.shape) * ITEMSIZE[t.dtype]:
            raise DataLossError(f"tensor {t.name!r}: nbytes does not match dtype and shape")
        if not 0 <= t.shard < len(shards):
            raise DataLossError(f"tensor {t.name!r} points to missing shard {t.shard}")
        shard = shards[t.shard]
        if t.offset < shard.header_size or t.end > shard.size:
            raise DataLossError(f"tensor {t.name!r} lies outside shard {shard.file!r}")
        if t.name in seen:
            raise DataLossError(f"tensor {t.name!r} appears twice")
        seen.add(t.name)
    return Manifest(
        format_version=version,
        artifact_id=_get(doc, "artifact_id", str),
        key=_get(doc, "key", str),
        created_at=float(_get(doc, "created_at", float)),
        checksum_algorithm=_get(doc, "checksum_algorithm", str),
        shards=shards,
        tensors=tensors,
    )
