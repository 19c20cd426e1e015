"""Canonical dtype names shared by every tier, transport and the disk format.  [SDK, daemon]

A dtype travels as a short string (``"bfloat16"``, ``"float8_e4m3fn"``), never as a pickled
torch object, so the daemon and Global Store handle metadata without importing torch.
``torch_dtype`` / ``dtype_name`` convert at the SDK edge; torch is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tensorcast_ray._errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

__all__ = ["ITEMSIZE", "SAFETENSORS_NAME", "dtype_name", "itemsize", "torch_dtype"]

#: bytes per element of every dtype tensorcast_ray stores.
ITEMSIZE: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "uint16": 2,
    "int16": 2,
    "uint32": 4,
    "int32": 4,
    "uint64": 8,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}

#: the safetensors header name of each dtype the safetensors format knows.
SAFETENSORS_NAME: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def itemsize(name: str) -> int:
    try:
        return ITEMSIZE[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown dtype {name!r}; known dtypes: {', '.join(sorted(ITEMSIZE))}"
        ) from None


def dtype_name(dtype: Any) -> str:
    """Canonical name of a torch or numpy dtype (``torch.bfloat16`` → ``"bfloat16"``)."""
    text = str(dtype)
    name = text.removeprefix("torch.")
    if name == "bool_":  # numpy spells it bool_ in some versions
        name = "bool"
    if name not in ITEMSIZE:
        raise InvalidArgumentError(
            f"dtype {text} is not supported; supported: {', '.join(sorted(ITEMSIZE))}"
        )
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a canonical name."""
    import torch

    itemsize(name)  # validates
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidArgumentError(f"dtype {name!r} is not available in torch {torch.__version__}")
    return dtype
