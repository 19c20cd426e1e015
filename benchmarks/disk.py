"""Shared-disk tier benchmark: our export/import vs safetensors, torch.save and a raw copy.

    python benchmarks/disk.py [--size-mib 1024] [--readers 4] [--no-store] [--json]

Builds a transformer-like state_dict (bf16 embeddings and attention/MLP weights, fp32
norms) of about ``--size-mib`` MiB in a temp dir on local disk and measures, in one run:

- tensorcast ``write_artifact`` / ``read_into`` (into a preallocated, pre-faulted buffer);
- ``safetensors.torch.save_file`` / ``load_file``;
- ``torch.save`` / ``torch.load``;
- a raw sequential copy of the same bytes (one file, 64 MiB buffers, dd-like), with and
  without fsync (our export fsyncs its shards and manifest; the others do not);
- with the store (default; ``--no-store`` skips it): ``tc.import_checkpoint`` of the
  safetensors file written above vs ``safetensors.torch.load_file`` (lazy: it maps the file)
  and ``load_file`` + a private copy of every tensor; ``tc.export`` vs ``save_file``; and the
  memory N readers on one node hold (one import in shared memory, every reader a zero-copy
  ``tc.get``; vs one ``load_file`` per reader). These start a local Ray of their own
  (``ray.init(address="local")`` + ``tc.init(mode="create", global_store_mode="none")``) and
  shut it down at the end, leaving nothing in /dev/shm.

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
from typing import Any

import torch
from _timing import timed  # benchmarks/ is on sys.path when run as a script
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


def anon_bytes() -> int:
    """Private anonymous memory of this process (copies; not file or shared-memory pages)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


def touch(tensors: dict[str, torch.Tensor]) -> None:
    """Read one byte per page of every tensor, so lazily mapped bytes are really there."""
    for t in tensors.values():
        flat = t.reshape(-1).view(torch.uint8)
        if flat.numel():
            flat[::4096].sum()


def store_cases(
    sd: dict[str, torch.Tensor], st: str, tmp: str, readers: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """tc.import_checkpoint / tc.export against safetensors, on a local Ray of our own."""
    import uuid

    import ray

    import tensorcast_ray as tc
    from tensorcast_ray._shm import segment_prefix

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    shm_before = set(os.listdir("/dev/shm"))
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        namespace=namespace,
        _temp_dir=tempfile.mkdtemp(prefix="rtc-bench-", dir="/tmp"),
    )
    results: dict[str, float] = {}
    memory: dict[str, Any] = {}
    node_id = str(ray.get_runtime_context().get_node_id())
    try:
        tc.init(mode="create", namespace=namespace, global_store_mode="none")
        runs = iter(range(1 << 30))

        def do_import() -> None:
            key = f"bench:i{next(runs)}"
            tc.import_checkpoint(st, key)
            tc.delete(key)

        results["tc.import_checkpoint"] = timed(do_import)
        results["load_file (lazy map)"] = timed(lambda: load_file(st))
        results["load_file+clone"] = timed(lambda: {k: v.clone() for k, v in load_file(st).items()})

        # Memory of N readers on one node: one import into shared memory, each reader a
        # zero-copy tc.get; vs each reader calling load_file (+ a private copy).
        base = anon_bytes()
        put = tc.import_checkpoint(st, "bench:shared")
        got = tc.get("bench:shared")
        touch(got)
        tc_reader = max(anon_bytes() - base, 0)
        start = time.perf_counter()
        tc.get("bench:shared")
        results["tc.get after import"] = time.perf_counter() - start
        del got
        base = anon_bytes()
        lazy = load_file(st)
        touch(lazy)
        lazy_reader = max(anon_bytes() - base, 0)
        del lazy
        base = anon_bytes()
        private = {k: v.clone() for k, v in load_file(st).items()}
        clone_reader = max(anon_bytes() - base, 0)
        del private
        memory = {
            "readers": readers,
            "tc shared memory (once per node)": put.nbytes,
            "tc private per reader": tc_reader,
            "load_file private per reader": lazy_reader,
            "load_file+clone private per reader": clone_reader,
        }

        sources = 0

        def do_export() -> None:
            nonlocal sources
            sources += 1
            root = os.path.join(tmp, f"export-{sources}")
            tc.export("bench:shared", root)
            shutil.rmtree(root, ignore_errors=True)

        results["tc.export"] = timed(do_export)
        st2 = os.path.join(tmp, "save.safetensors")
        results["save_file"] = timed(lambda: save_file(sd, st2))

        def save_synced() -> None:  # as durable as our export, which fsyncs
            save_file(sd, st2)
            fd = os.open(st2, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        results["save_file+fsync"] = timed(save_synced)
        tc.delete("bench:shared")
    finally:
        tc.shutdown()
        ray.shutdown()
    prefix = segment_prefix(namespace, node_id)  # other Ray instances may share /dev/shm
    ours = sorted(n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith(prefix))
    if ours:
        raise RuntimeError(f"the benchmark left shared memory behind: {ours}")
    return results, memory


def run(size_mib: int, store: bool = True, readers: int = 4) -> dict[str, Any]:
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
        store_seconds, memory = store_cases(sd, st, tmp, readers) if store else ({}, {})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "bytes": total,
        "tensors": len(sd),
        "shards": len(manifest.shards),
        "seconds": results,
        "store_seconds": store_seconds,
        "memory": memory,
    }


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
    store = res["store_seconds"]
    if store:
        ti, te = store["tc.import_checkpoint"], store["tc.export"]
        lines.append(
            "store cases (a local Ray of this run; the file is in the page cache; "
            "ratio = time of the alternative ÷ ours, > 1: ours is faster):"
        )
        for k, v in store.items():
            ours = te if "save" in k else ti
            ratio = "" if k.startswith("tc.") else f"{v / ours:.2f}x"
            lines.append(f"  {k:<26}{v:>9.3f}{total / v / 1e6:>9.0f}   {ratio}")
        mem, n = res["memory"], res["memory"]["readers"]
        ours_mem = mem["tc shared memory (once per node)"] + n * mem["tc private per reader"]
        lines.append(
            f"  N={n} readers on one node: one import + {n} x tc.get = {ours_mem / MiB:.0f} MiB "
            f"(shared memory, {mem['tc private per reader'] / MiB:.1f} MiB private per reader); "
            f"{n} x load_file = {n * mem['load_file private per reader'] / MiB:.0f} MiB private "
            f"(it maps the file: the page cache holds it, shared); {n} x load_file+clone = "
            f"{n * mem['load_file+clone private per reader'] / MiB:.0f} MiB private"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--readers", type=int, default=4, help="N for the memory comparison")
    parser.add_argument(
        "--no-store", action="store_true", help="skip the tc.import/export cases (no Ray)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    res = run(args.size_mib, store=not args.no_store, readers=args.readers)
    print(json.dumps(res, indent=1) if args.json else report(res))


if __name__ == "__main__":
    main()
