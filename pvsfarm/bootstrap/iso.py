"""The boot ISO: for targets that cannot PXE (or whose DHCP may not carry boot options).

BIOS El Torito, no emulation, built with pycdlib (no external ISO tool, no
loop mount)::

    /isolinux/isolinux.bin    Debian's isolinux (boot image; boot-info-table patched in)
    /isolinux/ldlinux.c32     Debian's syslinux-common (isolinux's core module)
    /isolinux/isolinux.cfg    KERNEL ipxe.lkrn + INITRD bootstrap.ipxe
    /isolinux/ipxe.lkrn       Debian's ipxe: a Linux-kernel-format iPXE
    /isolinux/bootstrap.ipxe  the farm's bootstrap script
    /isolinux/boot.cat        the El Torito boot catalog

iPXE's ``.lkrn`` runs an initrd that starts with ``#!ipxe`` as its script,
so the target needs no DHCP boot options and no TFTP: the script does plain
``dhcp`` for an address, then logs in to the farm over HTTP. In ``live``
mode the script fetches ``/bootstrap.ipxe`` from any listed node, which
carries the current live server list: adding a node needs no new ISO.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pycdlib

from pvsfarm.bootstrap.ipxe import Endpoint, bootstrap_script
from pvsfarm.errors import InvalidInput, NotFound, StoreError

DHCP_RETRY_S = 5
ISOLINUX_CFG = """\
# pvsfarm boot ISO (bootstrap v{version}): start iPXE with the farm's bootstrap as its script
DEFAULT pvsfarm
PROMPT 0
TIMEOUT 0
SAY pvsfarm: starting iPXE (bootstrap v{version})
LABEL pvsfarm
  KERNEL ipxe.lkrn
  INITRD bootstrap.ipxe
"""


@dataclass(frozen=True, slots=True)
class IsoSources:
    """Where the loaders come from (Debian's packages by default)."""

    isolinux_bin: Path = Path("/usr/lib/ISOLINUX/isolinux.bin")
    """Debian package ``isolinux``."""
    ldlinux_c32: Path = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
    """Debian package ``syslinux-common``."""
    ipxe_lkrn: Path = Path("/usr/lib/ipxe/ipxe.lkrn")
    """Debian package ``ipxe``."""

    def read(self) -> dict[str, bytes]:
        """The three loader files by their name on the ISO; missing ones named with their package."""
        packages = {"isolinux_bin": "isolinux", "ldlinux_c32": "syslinux-common", "ipxe_lkrn": "ipxe"}
        out = {}
        for attr, package in packages.items():
            path: Path = getattr(self, attr)
            try:
                out[path.name] = path.read_bytes()
            except OSError as exc:
                raise NotFound(f"{path}: cannot read ({exc.strerror}); install Debian's {package} package "
                               f"(apt-get install {package})") from exc
        return out


def _dhcp_prelude(version: int, mode: str) -> list[str]:
    # Plain DHCP for an address: boot options (66/67) may be absent or point elsewhere.
    return ["#!ipxe", f"# pvsfarm boot ISO: bootstrap v{version} ({mode} mode)", ":pvsfarm_net",
            "echo pvsfarm: DHCP for an address", "dhcp && goto pvsfarm_online ||",
            f"echo pvsfarm: no DHCP answer; retrying in {DHCP_RETRY_S} s", f"sleep {DHCP_RETRY_S}",
            "goto pvsfarm_net", ":pvsfarm_online"]


def _live_lines(servers: Sequence[Endpoint], timeout_ms: int) -> list[str]:
    """Ask any reachable node for the current bootstrap (it lists the live farm)."""
    lines = [":retry"]
    for i, server in enumerate(servers):
        lines += [f"echo pvsfarm: live server list from {server.name}",
                  f"chain --timeout {timeout_ms} {server.base_url}/bootstrap.ipxe && goto done || goto s{i + 1}",
                  f":s{i + 1}"]
    return lines + ["echo pvsfarm: no farm server answered; retrying", "sleep 10", "goto retry", ":done", ""]


def iso_script(servers: Sequence[Endpoint], timeout_ms: int, version: int, *, live: bool) -> str:
    """The ISO's iPXE script: DHCP first, then login via the listed servers (or their live list)."""
    if not servers:
        raise NotFound("the bootstrap names no servers: `pvsfarm bootstrap configure --server ...` first")
    prelude = _dhcp_prelude(version, "live" if live else "listed")
    if live:
        return "\n".join(prelude + _live_lines(servers, timeout_ms))
    body = bootstrap_script(servers, timeout_ms, version).split("\n")[1:]  # drop its own "#!ipxe"
    return "\n".join(prelude + body)


def _iso_name(name: str) -> str:
    return f"/ISOLINUX/{name.upper()};1"


def _add(iso: pycdlib.PyCdlib, name: str, data: bytes) -> None:
    iso.add_fp(io.BytesIO(data), len(data), _iso_name(name), rr_name=name, joliet_path=f"/isolinux/{name}")


def build_iso(script: str, version: int, out: Path, sources: IsoSources | None = None) -> str:
    """Write the bootable ISO to ``out`` (atomically); returns its ``sha256:<hex>``."""
    if not script.startswith("#!ipxe"):
        raise InvalidInput("an iPXE initrd script must start with #!ipxe")
    files = (sources or IsoSources()).read()
    files["isolinux.cfg"] = ISOLINUX_CFG.format(version=version).encode()
    files["bootstrap.ipxe"] = script.encode()
    iso = pycdlib.PyCdlib()
    # Level 3: "ipxe.lkrn"/"bootstrap.ipxe" are not 8.3 names; Rock Ridge keeps them lower case.
    iso.new(interchange_level=3, rock_ridge="1.09", joliet=3, vol_ident="PVSFARM_BOOT")
    iso.add_directory("/ISOLINUX", rr_name="isolinux", joliet_path="/isolinux")
    for name, data in files.items():
        _add(iso, name, data)
    iso.add_eltorito(_iso_name("isolinux.bin"), bootcatfile=_iso_name("boot.cat"), rr_bootcatname="boot.cat",
                     joliet_bootcatfile="/isolinux/boot.cat", boot_load_size=4, boot_info_table=True,
                     media_name="noemul")
    partial = out.with_name(f".{out.name}.partial")
    try:
        iso.write(str(partial))
        iso.close()
        digest = hashlib.sha256(partial.read_bytes()).hexdigest()
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise StoreError(f"{out}: cannot write the ISO ({exc.strerror})") from exc
    return f"sha256:{digest}"
