"""`pvsfarm demo` (simulated targets): the timeline names the nodes that answered each
step and a failover, and nothing of the demo is left behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is missing"),
]


def demo_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("pvsdemo-")}


def test_demo_boots_fails_over_and_cleans_up() -> None:
    before = demo_namespaces()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PVSFARM_")}
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pvsfarm", "demo", "--simulated"], capture_output=True, text=True,
                         timeout=90,
                         env=env, cwd=ROOT)
    elapsed = time.monotonic() - start
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert elapsed < 60, f"demo took {elapsed:.1f} s"
    timeline = out.split("timeline (sorted):", 1)[1]
    for step in (r"DHCP\s+lease 10\.79\.0\.2\d/24 from n[12]", r"TFTP\s+boot\.ipxe from n[12]",
                 r"login\s+answered by n[12]: vDisk demo assigned to n[12]", r"NBD\s+vDisk served by n[12]"):
        assert len(re.findall(step, timeline)) == 3, (step, out)
    killed = re.search(r"kill -9 (n[12]) \(the busier node: 2 of 3", timeline)
    assert killed, out
    victim = killed.group(1)
    survivor = "n2" if victim == "n1" else "n1"
    assert len(re.findall(rf"FAILOVER {victim} -> {survivor} in \d+\.\d+ s", timeline)) == 2, out
    assert len(re.findall(rf"booted: 4 MiB read, sha256 verified, last served by {survivor}", timeline)) == 3, out
    assert demo_namespaces() == before
    tmp = re.search(r"files in (\S+);", out)
    assert tmp and not Path(tmp.group(1)).exists()
    print(f"\npvsfarm demo: {elapsed:.1f} s\n{timeline}")


def test_demo_needs_root() -> None:
    if os.geteuid() == 0:
        code = ("import os; os.geteuid = lambda: 1000\n"
                "from pvsfarm.cli import main; import sys; sys.argv = ['pvsfarm', 'demo']; main()")
    else:
        code = "from pvsfarm.cli import main; import sys; sys.argv = ['pvsfarm', 'demo']; main()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode != 0
    assert "needs root" in res.stdout + res.stderr and "Traceback" not in res.stderr
