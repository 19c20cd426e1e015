"""Hostile and careless checkpoint files: refused with a clear error, never followed, never
waited on.  No Ray: the disk layer alone (``scan_checkpoint`` / ``read_checkpoint_into``)."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorcast_ray._disk import read_checkpoint_into, scan_checkpoint
from tensorcast_ray._disk._safetensors import MAX_DIMS, parse_header
from tensorcast_ray._errors import (
    ArtifactError,
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    PermissionDeniedError,
)


def _file(entries: dict[str, Any], data: bytes, raw_header: bytes | None = None) -> bytes:
    body = raw_header if raw_header is not None else json.dumps(entries).encode()
    return struct.pack("<Q", len(body)) + body + data


def _good(path: Path, name: str = "w", n: int = 4) -> None:
    data = np.arange(n, dtype=np.float32).tobytes()
    entry = {"dtype": "F32", "shape": [n], "data_offsets": [0, len(data)]}
    path.write_bytes(_file({name: entry}, data))


def _scan_with_deadline(url: str, seconds: float = 20.0) -> Any:
    """Run scan_checkpoint in a thread: a hang fails the test instead of the whole run."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = scan_checkpoint(url)
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"scan_checkpoint({url!r}) still blocked after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_fifo_named_safetensors_is_refused_not_waited_on(tmp_path: Path) -> None:
    _good(tmp_path / "a.safetensors")
    fifo = tmp_path / "b.safetensors"
    os.mkfifo(fifo)
    try:
        with pytest.raises(InvalidArgumentError, match="not a regular file"):
            _scan_with_deadline(str(tmp_path))
    finally:
        # Unblock an old-code reader stuck in open() so the thread can end.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK) if _has_reader(fifo) else None
        if fd is not None:
            os.close(fd)


def _has_reader(fifo: Path) -> bool:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        return True
    except OSError:
        return False


def test_directory_named_safetensors_is_invalid_argument(tmp_path: Path) -> None:
    _good(tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").mkdir()
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        scan_checkpoint(str(tmp_path))


def test_symlink_out_of_the_directory_is_never_read(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _good(outside / "secret.safetensors", name="secret")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _good(ckpt / "a.safetensors")
    os.symlink(outside / "secret.safetensors", ckpt / "b.safetensors")
    with pytest.raises(PermissionDeniedError, match="outside its directory"):
        scan_checkpoint(str(ckpt))


def test_symlink_swapped_in_after_the_scan_is_never_read(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _good(outside / "a.safetensors")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _good(ckpt / "a.safetensors")
    found = scan_checkpoint(str(ckpt))
    os.unlink(ckpt / "a.safetensors")
    os.symlink(outside / "a.safetensors", ckpt / "a.safetensors")  # same size, other file
    buf = bytearray(16)
    with pytest.raises(PermissionDeniedError):
        read_checkpoint_into(found, lambda t: memoryview(buf))


def test_symlink_inside_the_directory_is_read(tmp_path: Path) -> None:
    _good(tmp_path / "real.bin", n=3)
    os.symlink("real.bin", tmp_path / "a.safetensors")
    found = scan_checkpoint(str(tmp_path))
    assert [t.name for t in found.tensors] == ["w"]


def _header(entries: Any) -> bytes:
    body = json.dumps(entries).encode() if not isinstance(entries, bytes) else entries
    return struct.pack("<Q", len(body)) + body


@pytest.mark.parametrize(
    ("entries", "field"),
    [
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [3.7, 19.7]}}, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, "shape"),
        ({"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, "shape"),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "shape"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [False, 16]}}, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [1] * 100001, "data_offsets": [0, 4]}}, "shape"),
        ({"w": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, "shape"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}}, "data_offsets"),
        ({"w": {"dtype": 7, "shape": [4], "data_offsets": [0, 16]}}, "dtype"),
        ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "negative"),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            "overlaps",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]},
            },
            "gap",
        ),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, "starts at 16"),
        ({"a\x00b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "NUL"),
        ({"x" * 100_000: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "characters"),
        ({"__metadata__": {"k": 1}}, "__metadata__"),
    ],
)
def test_malformed_headers_are_data_loss_naming_the_field(entries: Any, field: str) -> None:
    with pytest.raises(DataLossError, match=field):
        parse_header(_header(entries), "file 'x.safetensors'")


def test_duplicate_tensor_names_are_data_loss() -> None:
    e = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = f'{{"w": {e}, "w": {e}}}'.encode()
    with pytest.raises(DataLossError, match="twice"):
        parse_header(_header(raw), "f")


def test_strict_parser_still_reads_valid_headers() -> None:
    entries = {
        "__metadata__": {"format": "pt"},
        "b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [16, 28]},
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "z": {"dtype": "F32", "shape": [0, 5], "data_offsets": [28, 28]},
        "s": {"dtype": "I64", "shape": [], "data_offsets": [28, 36]},
    }
    parsed = parse_header(_header(entries), "f")
    assert [t.name for t in parsed.tensors] == ["a", "b", "z", "s"]
    assert parsed.tensors[1].shape == (2, 3)
    assert parsed.metadata == {"format": "pt"}
    assert len([1] * MAX_DIMS) == MAX_DIMS  # the bound itself is accepted:
    many = {"w": {"dtype": "F32", "shape": [1] * MAX_DIMS, "data_offsets": [0, 4]}}
    assert parse_header(_header(many), "f").tensors[0].shape == (1,) * MAX_DIMS


def test_unsupported_dtype_stays_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError, match="not supported"):
        parse_header(_header({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}), "f")


def test_float_offsets_never_import_misaligned_bytes(tmp_path: Path) -> None:
    # The reported case: offsets [3.7, 63.7] were truncated to [3, 63] and imported as ready.
    data = bytes(range(64))
    entries = {"w": {"dtype": "F32", "shape": [15], "data_offsets": [3.7, 63.7]}}
    (tmp_path / "m.safetensors").write_bytes(_file(entries, data))
    with pytest.raises(ArtifactError) as info:
        scan_checkpoint(str(tmp_path))
    assert isinstance(info.value, DataLossError)
    assert "data_offsets" in info.value.message


def _shards(directory: Path, count: int, nbytes: int) -> None:
    for i in range(count):
        data = bytes([i]) * nbytes
        entry = {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}
        (directory / f"s{i}.safetensors").write_bytes(_file({f"t{i}": entry}, data))


def test_a_storage_that_stalls_ends_the_read_at_the_deadline(tmp_path: Path) -> None:
    # Three 2 MiB tensors read one ranged read at a time; the storage "stalls" after the first
    # (the progress callback runs in the reading thread, so sleeping there delays the next read).
    import time

    _shards(tmp_path, 3, 2 << 20)
    found = scan_checkpoint(str(tmp_path))
    bufs = {t.name: bytearray(t.nbytes) for t in found.tensors}
    deadline = time.monotonic() + 0.5

    def stall(done: int, total: int) -> None:
        time.sleep(0.6)

    with pytest.raises(DeadlineExceededError, match="deadline"):
        read_checkpoint_into(
            found,
            lambda t: memoryview(bufs[t.name]),
            parallelism=1,
            progress=stall,
            deadline=deadline,
        )


def test_scan_past_its_deadline_is_deadline_exceeded(tmp_path: Path) -> None:
    import time

    _shards(tmp_path, 2, 16)
    with pytest.raises(DeadlineExceededError):
        scan_checkpoint(str(tmp_path), deadline=time.monotonic() - 1)
    assert len(scan_checkpoint(str(tmp_path), deadline=time.monotonic() + 60).tensors) == 2
