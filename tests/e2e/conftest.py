"""Fixtures of the QEMU end-to-end tests (issue 6): the cached boot artifacts
(session) and one two-node farm per module, healed before every test."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.artifacts import BootArtifacts, Unavailable, build_all
from tests.e2e.harness import LOGIN_URLS, QEMU_ROM, E2EFarm


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "QEMU e2e tests need root (network namespaces, taps)"
    for tool in ("qemu-system-x86_64", "ip", "curl"):
        if shutil.which(tool) is None:
            return f"QEMU e2e tests need `{tool}` (tools/apt-packages.txt)"
    if not QEMU_ROM.exists():
        return f"QEMU e2e tests need the iPXE NIC ROM {QEMU_ROM} (package ipxe-qemu)"
    if not Path("/dev/net/tun").exists():
        return "QEMU e2e tests need /dev/net/tun"
    return None


@pytest.fixture(scope="session")
def boot_artifacts() -> BootArtifacts:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    try:
        art = build_all(LOGIN_URLS)
    except Unavailable as exc:
        pytest.skip(f"cannot build the e2e boot artifacts: {exc}")
    print(f"\ne2e artifacts: kernel {art.kernel.version}, {art.initrd.name} ({art.initrd.stat().st_size} B), "
          f"{art.disk.name}; {'built in %.1f s' % art.build_s if art.build_s else 'from the cache'}")
    return art


@pytest.fixture(scope="module")
def e2e_farm(boot_artifacts: BootArtifacts, tmp_path_factory: pytest.TempPathFactory,
             request: pytest.FixtureRequest) -> Iterator[E2EFarm]:
    devices = getattr(request.module, "DEVICES")
    farm = E2EFarm(tmp_path_factory.mktemp("e2e"), boot_artifacts)
    start = time.monotonic()
    try:
        farm.start(devices)
        print(f"\ne2e farm up in {time.monotonic() - start:.1f} s ({farm.tmp})")
        yield farm
    finally:
        farm.close()


@pytest.fixture
def farm(e2e_farm: E2EFarm) -> Iterator[E2EFarm]:
    """The module's farm in its starting state (database up, both nodes up); VMs stopped after."""
    e2e_farm.heal()
    try:
        yield e2e_farm
    finally:
        for vm in e2e_farm.vms:
            vm.stop()
        e2e_farm.vms.clear()
