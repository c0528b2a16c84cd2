"""`pvsfarm demo` with QEMU installed (issue 6): a VM PXE-boots Linux from the demo farm, the
node serving it is killed, the agent fails over; the timeline says which node did what, and
nothing of the demo is left behind."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvsfarm.lab import artifacts
from tests.e2e.artifacts import BootArtifacts

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.netns]


def demo_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("pvsdemo-")}


def qemu_pids() -> set[str]:
    out = subprocess.run(["pgrep", "-f", "tap-vm1"], capture_output=True, text=True, timeout=10).stdout
    return set(out.split())


def test_demo_boots_a_vm_and_fails_over(boot_artifacts: BootArtifacts) -> None:
    # boot_artifacts: skips where the e2e tests cannot run, and warms the shared cache (kernel, initramfs)
    before, qemu_before = demo_namespaces(), qemu_pids()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PVSFARM_") or k == "PVSFARM_E2E_CACHE"}
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pvsfarm", "demo"], capture_output=True, text=True, timeout=240,
                         env=env, cwd=ROOT)
    elapsed = time.monotonic() - start
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "one QEMU VM" in out and "no QEMU VM" not in out, out
    timeline = out.split("timeline (sorted):", 1)[1]
    sha = hashlib.sha256(artifacts.marker_bytes()).hexdigest()
    first = re.search(rf"MARKER sha256={sha} verified, served by (n[12])", timeline)
    assert first, out
    victim = first.group(1)
    survivor = "n2" if victim == "n1" else "n1"
    for step in (r"DHCP\s+lease 10\.79\.0\.50/\S+ from n[12]", r"TFTP\s+boot\.ipxe from n[12]",
                 rf"login\s+answered by n[12] \(iPXE\): vDisk demo assigned to {victim}",
                 rf"sanboot vDisk over HTTP from {victim}", rf"NBD\s+vDisk attached as /dev/nbd\d from {victim}"):
        assert re.search(step, timeline), (step, out)
    assert re.search(rf"kill -9 {victim} \(it serves the VM's vDisk", timeline), out
    assert re.search(rf"FAILOVER {victim} -> {survivor} \(relogin via n[12].*s after the kill\)", timeline), out
    assert re.search(rf"NBD\s+vDisk attached as /dev/nbd\d from {survivor}", timeline), out
    assert re.search(rf"MARKER sha256={sha} verified, served by {survivor}", timeline), out
    summary = re.search(r"booted Linux from the farm in (\d+\.\d) s .* failed over to (n[12]) in (\d+\.\d) s.*"
                        r"all verified; total (\d+\.\d) s", out)
    assert summary and summary.group(2) == survivor, out
    assert float(summary.group(4)) < 90, out
    assert demo_namespaces() == before
    assert qemu_pids() == qemu_before, "QEMU left running"
    tmp = re.search(r"files in (\S+);", out)
    assert tmp and not Path(tmp.group(1)).exists()
    print(f"\npvsfarm demo (VM): {elapsed:.1f} s\n{timeline}")
