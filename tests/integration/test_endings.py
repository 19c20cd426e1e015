"""Every way a program or cluster can end leaves no shared memory behind (issue 8, item 1).

Each ending runs for real in a fresh Python process with its own Ray and namespace: a 64 MiB
put, then the ending; the test then waits (60 s deadline) until the daemon's files in
/dev/shm and its socket are gone and its guardian has exited, with no later daemon and no
``tensorcast-ray gc``. Not the ``namespace`` fixture: that one stops daemons cleanly.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import leftovers, wait_for

ROOT = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 60

PUT = """
import json, os, sys, time
import psutil, ray, torch
import tensorcast_ray as tc

ns = sys.argv[1]
def report(**fields):
    print(json.dumps(fields), flush=True)

def daemon_info():
    handle = ray.get_actor(f"daemon:{ray.get_runtime_context().get_node_id()}", namespace=ns)
    return handle, ray.get(handle.info.options(max_task_retries=-1).remote(), timeout=120)
"""
AFTER_INIT = """
weights = {"w": torch.arange(16 << 20, dtype=torch.float32)}  # 64 MiB
tc.put(weights, key="w:v1")
handle, info = daemon_info()
report(pid=info["pid"], guardian=info["guardian_pid"])
"""
RAY_LOCAL = (
    'ray.init(address="local", num_cpus=1, include_dashboard=False)\ntc.init(namespace=ns)\n'
)

ENDINGS = {
    # tc.init starts Ray itself; the script ends without tc.shutdown(). The exit hook
    # registered before init runs after init's own (atexit runs them last-registered first)
    # but before Ray's: by then init's hook has stopped the daemon cleanly.
    "init_started_ray_no_shutdown": textwrap.dedent(
        """
        import atexit
        from tests.helpers import leftovers
        atexit.register(lambda: report(left_at_exit=leftovers(ns)))
        tc.init(ray_address="local", namespace=ns)
        """
    )
    + AFTER_INIT,
    "ray_shutdown": RAY_LOCAL + AFTER_INIT + "ray.shutdown()\n",
    # tc.init starts Ray; the script shuts Ray down itself, never calling tc.shutdown()
    "init_started_ray_then_ray_shutdown": 'tc.init(ray_address="local", namespace=ns)\n'
    + AFTER_INIT
    + "ray.shutdown()\n",
    "script_ends_without_any_shutdown": RAY_LOCAL + AFTER_INIT,
    # the whole node gone at once: every process of this Ray and the driver, SIGKILLed
    "sigkill_of_the_node": RAY_LOCAL
    + AFTER_INIT
    + textwrap.dedent(
        """
        for proc in psutil.Process().children(recursive=True):
            proc.kill()
        os.kill(os.getpid(), 9)
        """
    ),
}


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    temp = tempfile.mkdtemp(prefix="rte-", dir="/tmp")  # Ray's sockets need a short path
    environ = {**os.environ, "RAY_TMPDIR": temp, "PYTHONPATH": str(ROOT)}
    environ.pop("RAY_ADDRESS", None)
    yield environ
    shutil.rmtree(temp, ignore_errors=True)


def run_script(
    body: str, ns: str, environ: dict[str, str], tmp_path: Path
) -> tuple[int, list[dict[str, Any]]]:
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-c", PUT + body, ns], stdout=o, stderr=e, env=environ, cwd=ROOT
        )
        try:
            rc = proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    assert lines, f"the script reported nothing; stderr:\n{err.read_text()[-4000:]}"
    return rc, lines


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def assert_gone(ns: str, guardian: int) -> None:
    wait_for(lambda: not leftovers(ns), GONE_WITHIN_S, f"the shared memory of {ns} to be freed")
    wait_for(lambda: not running(guardian), 30, "the guardian to exit")


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_ending_frees_shared_memory(ending: str, env: dict[str, str], tmp_path: Path) -> None:
    ns = f"e-{uuid.uuid4().hex[:10]}"
    temp = tempfile.mkdtemp(prefix="r", dir=env["RAY_TMPDIR"])
    rc, lines = run_script(ENDINGS[ending], ns, {**env, "RAY_TMPDIR": temp}, tmp_path)
    assert rc == (-signal.SIGKILL if ending == "sigkill_of_the_node" else 0), (
        tmp_path / "stderr"
    ).read_text()[-4000:]
    # Nothing at exit started Ray again (listing actors after ray.shutdown() would).
    assert len(glob.glob(os.path.join(temp, "ray", "session_2*"))) == 1
    if ending == "init_started_ray_no_shutdown":
        assert lines[-1] == {"left_at_exit": []}, "stopped cleanly at interpreter exit"
    assert_gone(ns, lines[0]["guardian"])


RESTART_THEN_KILL = (
    RAY_LOCAL
    + AFTER_INIT
    + textwrap.dedent(
        """
        from tests.helpers import leftovers, wait_for

        # SIGKILL of the daemon process alone: Ray restarts it, it re-adopts the artifact and
        # the old guardian hands over to the new one.
        os.kill(info["pid"], 9)
        def restarted():
            try:
                new = ray.get(handle.info.remote(), timeout=5)
            except Exception:
                return None
            return new if new["pid"] != info["pid"] else None
        new = wait_for(restarted, 120, "the daemon to restart")
        got = tc.get("w:v1")["w"]
        wait_for(lambda: not psutil.pid_exists(info["guardian_pid"]) or
                 psutil.Process(info["guardian_pid"]).status() == "zombie", 30, "old guardian exit")
        report(pid=new["pid"], guardian=new["guardian_pid"], readopted=bool(torch.equal(got,
               weights["w"])), guardian_alive=psutil.Process(new["guardian_pid"]).is_running())
        del got
        # ray.kill without restart while Ray lives: the guardian frees it after its grace.
        ray.kill(handle, no_restart=True)
        wait_for(lambda: not leftovers(ns), 60, "the shared memory to be freed")
        report(freed=True)
        """
    )
)


def test_restart_readopts_then_kill_without_restart_frees(
    env: dict[str, str], tmp_path: Path
) -> None:
    ns = f"e-{uuid.uuid4().hex[:10]}"
    rc, lines = run_script(RESTART_THEN_KILL, ns, env, tmp_path)
    assert rc == 0, (tmp_path / "stderr").read_text()[-4000:]
    first, restarted, freed = lines
    assert restarted["pid"] != first["pid"] and restarted["guardian"] != first["guardian"]
    assert restarted["readopted"] and restarted["guardian_alive"]
    assert freed == {"freed": True}
    assert_gone(ns, restarted["guardian"])


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_ray_stop_of_a_cluster_a_job_only_joined(env: dict[str, str], tmp_path: Path) -> None:
    """A cluster from ``ray start``; a job joins it through RAY_ADDRESS and ends (its daemon
    must stay: other jobs use it); then the cluster is stopped as ``ray stop`` does it —
    SIGTERM, then SIGKILL, to the cluster's processes (only this cluster's: its session)."""
    gcs, client, agent, agent_grpc, runtime_env = free_ports(5)
    temp = tempfile.mkdtemp(prefix="rts-", dir=env["RAY_TMPDIR"])
    start = subprocess.run(
        [
            *(os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head"),
            *("--port", str(gcs), "--temp-dir", temp, "--num-cpus", "1"),
            *("--node-ip-address", "127.0.0.1", "--include-dashboard", "false"),
            *("--ray-client-server-port", str(client)),
            *("--dashboard-agent-listen-port", str(agent)),
            *("--dashboard-agent-grpc-port", str(agent_grpc)),
            *("--runtime-env-agent-port", str(runtime_env), "--disable-usage-stats"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # one session holds every process of this cluster
    )
    sid = _session_of_raylet(temp, start)
    try:
        assert start.returncode == 0, start.stderr[-4000:]
        ns = f"e-{uuid.uuid4().hex[:10]}"
        joined = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
        rc, lines = run_script("tc.init(namespace=ns)\n" + AFTER_INIT, ns, joined, tmp_path)
        assert rc == 0, (tmp_path / "stderr").read_text()[-4000:]
        assert running(lines[0]["pid"]) and leftovers(ns), "a joined job stopped the daemon"
        daemon, guardian = _sid(lines[0]["pid"]), _sid(lines[0]["guardian"])
        assert daemon == sid != guardian, (
            f"sessions: cluster {sid} daemon {daemon} guardian {guardian}"
        )
    finally:
        _stop([p for p in psutil.process_iter() if _sid(p.pid) == sid])
    assert_gone(ns, lines[0]["guardian"])


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


def _session_of_raylet(temp: str, start: subprocess.CompletedProcess[str]) -> int:
    """The session of the cluster in ``temp``: its raylet's (the `ray start` process that led
    it has exited)."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "raylet" and any(temp in a for a in proc.info["cmdline"] or []):
            return _sid(proc.pid)
    raise AssertionError(
        f"no raylet runs with --temp-dir {temp}; `ray start` exited {start.returncode}: "
        f"{start.stdout[-2000:]}{start.stderr[-2000:]}"
    )


def _stop(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=15)
