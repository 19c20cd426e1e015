"""The gRPC server helpers the daemon and the Global Store share live outside both."""

from __future__ import annotations

import subprocess
import sys


def test_the_global_store_does_not_import_the_daemon_package() -> None:
    probe = (
        "import sys, tensorcast_ray.global_store.actor; "
        "sys.exit(1 if any(m.startswith('tensorcast_ray.daemon') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0
