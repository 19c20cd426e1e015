"""``tensorcast-ray ls`` / ``inspect`` against the simulated 3-node cluster: the Global
Store's catalog (keys, sizes, the nodes holding each) and each node's account of its copy."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.multinode.conftest import node_ids, on_node

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(300)]

CLI = [sys.executable, "-m", "tensorcast_ray.cli"]


def _cli(address: str, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--address", address, "--namespace", ns, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-2000:])
    return result.stdout


def test_ls_and_inspect_show_keys_nodes_and_how_each_copy_came(cluster: Any, ns: str) -> None:
    # Defined here, not at module level, so Ray ships them by value (this test module is
    # not importable on the workers).
    def write(tc: Any) -> tuple[str, str]:
        import torch

        a = tc.put({"w": torch.ones(4, 4), "b": torch.arange(8)}, key="cli-a:v1")
        b = tc.put({f"t{i:02d}": torch.zeros(2) for i in range(25)}, key="cli-b:v1")
        return a.artifact_id, b.artifact_id

    def read(tc: Any) -> float:
        return float(tc.get("cli-a:v1")["w"].sum())

    n0, n1, _ = node_ids(cluster)
    a_id, b_id = on_node(0, ns, write)
    assert on_node(1, ns, read) == 16.0  # node 1 pulls a copy of cli-a:v1 from node 0

    commands: list[tuple[str, ...]] = [
        ("ls", "--json"),
        ("ls", "cli-a"),
        ("inspect", "cli-a:v1", "--json"),
        ("inspect", "cli-b:latest"),
        ("inspect", "cli-a:v9"),
        ("ls", "nothing-here"),
    ]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda c: _cli(cluster.address, ns, *c), commands))
    ls_json, ls_text, inspect_json, inspect_text, missing, empty = results

    # ls --json: both keys, sorted, with the catalog's sizes and the nodes holding each.
    entries = json.loads(_ok(ls_json))
    assert [e["key"] for e in entries] == ["cli-a:v1", "cli-b:v1"]
    a, b = entries
    assert (a["artifact_id"], a["nbytes"], a["tensors"], a["node_id"]) == (a_id, 128, 2, n0)
    assert (b["artifact_id"], b["nbytes"], b["tensors"], b["node_id"]) == (b_id, 200, 25, n0)
    assert [(r["node_id"], r["kind"]) for r in a["replicas"]] == [(n0, "original"), (n1, "cache")]
    assert [(r["node_id"], r["kind"]) for r in b["replicas"]] == [(n0, "original")]
    assert {r["tier"] for r in a["replicas"]} == {"stable_dram"}
    assert a["kind"] == "put" and a["seq"] > 0 and a["created_unix_ms"] > 0

    # ls PREFIX: a table of the matching key only.
    header, *rows = _ok(ls_text).splitlines()
    assert header.split() == ["KEY", "SIZE", "TENSORS", "DURABLE", "NODES"]
    assert [r.split() for r in rows] == [
        ["cli-a:v1", "128B", "2", "no", f"{n0[:12]}(original),{n1[:12]}(cache)"]
    ]

    # inspect --json: identity, tensors, and per node how its copy got there.
    report = json.loads(_ok(inspect_json))
    assert report["key"] == "cli-a:v1" and report["artifact_id"] == a_id
    assert report["nbytes"] == 128 and report["writer"] == n0 and report["seq"] == a["seq"]
    assert report["ntensors"] == 2 and "tensors_error" not in report
    assert report["durable"] is False and report["persistence_task_id"] is None
    assert {t["name"]: (t["dtype"], t["shape"], t["nbytes"]) for t in report["tensors"]} == {
        "w": ("float32", [4, 4], 64),
        "b": ("int64", [8], 64),
    }
    replicas = {r["node_id"]: r for r in report["replicas"]}
    assert list(replicas) == [n0, n1]
    assert replicas[n0]["kind"] == "original" and replicas[n0]["served_by"] == "local"
    assert replicas[n1]["kind"] == "cache" and replicas[n1]["served_by"] == "object_store"
    assert all("error" not in r and r["tier"] == "stable_dram" for r in replicas.values())

    # inspect (text): name:latest resolves; the first 20 tensors, then a count of the rest.
    text = _ok(inspect_text)
    lines = text.splitlines()
    assert "key          cli-b:v1" in lines and f"artifact_id  {b_id}" in lines
    assert "size         200B (200 bytes)" in lines and f"writer       {n0}" in lines
    assert "tensors      25" in lines and "durable      no" in lines
    names = [line.split()[0] for line in lines if line.startswith("  t")]
    assert names == [f"t{i:02d}" for i in range(20)]
    assert "  ... and 5 more (--json lists all)" in lines
    node_rows = [line.split() for line in lines if line.startswith(f"  {n0[:12]}")]
    assert node_rows == [[n0[:12], "original", "stable_dram", "local"]]

    # A missing key: one error line, exit code 1, nothing on stdout.
    assert missing.returncode == 1, (missing.stdout, missing.stderr)
    assert missing.stdout == ""
    assert missing.stderr.strip().splitlines()[-1].startswith("error: [NOT_FOUND] cli-a:v9 ")

    # A prefix nothing matches: no rows, not an error.
    assert _ok(empty) == "" and "no keys starting with 'nothing-here'" in empty.stderr


def test_without_a_global_store_says_how_to_start_one(cluster: Any) -> None:
    bare = f"m-bare-{uuid.uuid4().hex[:8]}"  # nothing was ever started in it
    with ThreadPoolExecutor(2) as pool:
        ls, inspect = pool.map(
            lambda c: _cli(cluster.address, bare, *c), [("ls",), ("inspect", "x:v1")]
        )
    for result in (ls, inspect):
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert f"error: no Global Store in namespace {bare!r}" in result.stderr
        assert "`tensorcast-ray global start`" in result.stderr
