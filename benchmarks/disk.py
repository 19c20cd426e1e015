"""Shared-disk tier benchmark: our export/import vs safetensors, torch.save and a raw copy.

    python benchmarks/disk.py [--size-mib 1024] [--json]

Builds a transformer-like state_dict (bf16 embeddings and attention/MLP weights, fp32
norms) of about ``--size-mib`` MiB in a temp dir on local disk and measures, in one run:

- tensorcast ``write_artifact`` / ``read_into`` (into a preallocated, pre-faulted buffer);
- ``safetensors.torch.save_file`` / ``load_file``;
- ``torch.save`` / ``torch.load``;
- a raw sequential copy of the same bytes (one file, 64 MiB buffers, dd-like), with and
  without fsync (our export fsyncs its shards and manifest; the others do not).

The page cache is not dropped (we have no root here), so reads are mostly from memory and
show the software overhead of each format; the output says so.  Each figure is the best
of two runs.  Ratios are throughput of
ours ÷ throughput of the alternative (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tensorcast_ray._disk import (
    TensorSource,
    read_checkpoint_into,
    read_into,
    read_manifest,
    scan_checkpoint,
    write_artifact,
)
from tensorcast_ray._dtypes import dtype_name

MiB = 1 << 20
CHUNK = 64 * MiB


def state_dict(size_mib: int, hidden: int = 1024) -> dict[str, torch.Tensor]:
    vocab = 8192
    sd: dict[str, torch.Tensor] = {
        "embed_tokens.weight": torch.randn(vocab, hidden).to(torch.bfloat16)
    }
    layer_bytes = (4 * hidden * hidden + 3 * hidden * 4 * hidden) * 2 + 2 * hidden * 4
    budget = size_mib * MiB - 2 * sd["embed_tokens.weight"].nbytes
    for i in range(max(1, round(budget / layer_bytes))):
        p = f"layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden).to(torch.bfloat16)
        sd[p + "mlp.gate_proj.weight"] = torch.randn(4 * hidden, hidden).to(torch.bfloat16)
        sd[p + "mlp.up_proj.weight"] = torch.randn(4 * hidden, hidden).to(torch.bfloat16)
        sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, 4 * hidden).to(torch.bfloat16)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    sd["norm.weight"] = torch.ones(hidden)
    sd["lm_head.weight"] = torch.randn(vocab, hidden).to(torch.bfloat16)
    return sd


def byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def timed(fn: Callable[[], Any], repeat: int = 2) -> float:
    """Best of ``repeat`` runs (the first run of a new file pays page-cache allocation)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(size_mib: int) -> dict[str, Any]:
    sd = state_dict(size_mib)
    total = sum(t.nbytes for t in sd.values())
    sources = [
        TensorSource(k, dtype_name(v.dtype), tuple(v.shape), byte_view(v)) for k, v in sd.items()
    ]
    arena = torch.ones(total, dtype=torch.uint8)  # preallocated, pre-faulted destination
    offsets: dict[str, int] = {}
    pos = 0
    for k, v in sd.items():
        offsets[k] = pos
        pos += v.nbytes
    flat = torch.cat([v.reshape(-1).view(torch.uint8) for v in sd.values()])
    arena_view = byte_view(arena)
    tmp = tempfile.mkdtemp(prefix="tc-disk-bench-")
    results: dict[str, float] = {}
    try:
        root = os.path.join(tmp, "store")

        def ours_write() -> None:
            shutil.rmtree(root, ignore_errors=True)
            write_artifact(root, "bench:v1", sources)

        results["tensorcast write"] = timed(ours_write)
        manifest = read_manifest(root, "bench:v1")
        results["tensorcast read"] = timed(
            lambda: read_into(
                root, manifest, lambda t: arena_view[offsets[t.name] : offsets[t.name] + t.nbytes]
            )
        )
        assert bytes(arena_view[:4096]) == bytes(byte_view(flat)[:4096])
        st = os.path.join(tmp, "model.safetensors")
        results["safetensors write"] = timed(lambda: save_file(sd, st))

        def st_read() -> None:  # load_file maps lazily: copy into the buffer, as ours does
            for k, t in load_file(st).items():
                arena[offsets[k] : offsets[k] + t.nbytes].copy_(t.reshape(-1).view(torch.uint8))

        results["safetensors read+copy"] = timed(st_read)

        def ckpt_import() -> None:  # our import of the same safetensors file (no checksums)
            ck = scan_checkpoint(st)
            read_checkpoint_into(
                ck, lambda t: arena_view[offsets[t.name] : offsets[t.name] + t.nbytes]
            )

        results["tensorcast ckpt import"] = timed(ckpt_import)
        results["tensorcast read unverified"] = timed(
            lambda: read_into(
                root,
                manifest,
                lambda t: arena_view[offsets[t.name] : offsets[t.name] + t.nbytes],
                verify=False,
            )
        )
        pt = os.path.join(tmp, "model.pt")
        results["torch.save"] = timed(lambda: torch.save(sd, pt))
        results["torch.load"] = timed(lambda: torch.load(pt, weights_only=True))
        raw = os.path.join(tmp, "raw.bin")
        src = byte_view(flat)

        def raw_write(sync: bool) -> None:
            with open(raw, "wb", buffering=0) as f:
                for p in range(0, total, CHUNK):
                    f.write(src[p : p + CHUNK])
                if sync:
                    os.fsync(f.fileno())

        def raw_read() -> None:
            with open(raw, "rb", buffering=0) as f:
                for p in range(0, total, CHUNK):
                    f.readinto(arena_view[p : p + CHUNK])

        results["raw write"] = timed(lambda: raw_write(False))
        results["raw write+fsync"] = timed(lambda: raw_write(True))
        results["raw read"] = timed(raw_read)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"bytes": total, "tensors": len(sd), "shards": len(manifest.shards), "seconds": results}


def report(res: dict[str, Any]) -> str:
    total, secs = res["bytes"], res["seconds"]
    mbps = {k: total / v / 1e6 for k, v in secs.items()}
    lines = [
        f"artifact: {total / MiB:.0f} MiB, {res['tensors']} tensors, {res['shards']} shard(s); "
        "page cache NOT dropped (reads mostly from memory); our write fsyncs, the others don't; "
        "best of 2 runs",
        f"{'operation':<28}{'seconds':>9}{'MB/s':>9}   tensorcast ÷ this (write or verified read)",
    ]
    for k, v in secs.items():
        ours = "tensorcast write" if ("write" in k or "save" in k) else "tensorcast read"
        ratio = "" if k.startswith("tensorcast") else f"{mbps[ours] / mbps[k]:.2f}x"
        lines.append(f"{k:<28}{v:>9.3f}{mbps[k]:>9.0f}   {ratio}")
    imp = mbps["tensorcast ckpt import"] / mbps["safetensors read+copy"]
    lines.append(f"checkpoint import ÷ safetensors load_file+copy of the same file: {imp:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    res = run(args.size_mib)
    print(json.dumps(res, indent=1) if args.json else report(res))


if __name__ == "__main__":
    main()
