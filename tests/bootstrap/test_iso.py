"""The boot ISO, checked structurally with pycdlib: El Torito catalog, loaders, isolinux config, script."""

from __future__ import annotations

import io
from pathlib import Path

import pycdlib
import pytest

from pvsfarm.bootstrap.ipxe import Endpoint
from pvsfarm.bootstrap.iso import IsoSources, build_iso, iso_script
from pvsfarm.errors import InvalidInput, NotFound

SERVERS = [Endpoint("a", "http://10.0.0.1:8080"), Endpoint("b", "http://10.0.0.2:8080")]


def read(iso: pycdlib.PyCdlib, rr_path: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, rr_path=rr_path)
    return out.getvalue()


@pytest.fixture
def built(tmp_path: Path) -> tuple[pycdlib.PyCdlib, str, str]:
    script = iso_script(SERVERS, 4000, 7, live=False)
    out = tmp_path / "boot.iso"
    digest = build_iso(script, 7, out)
    iso = pycdlib.PyCdlib()
    iso.open(str(out))
    yield iso, script, digest
    iso.close()


def test_el_torito_boots_isolinux_without_emulation(built) -> None:  # type: ignore[no-untyped-def]
    iso, _, digest = built
    assert digest.startswith("sha256:") and len(digest) == 71
    catalog = iso.eltorito_boot_catalog
    assert catalog is not None
    entry = catalog.initial_entry
    assert entry.boot_indicator == 0x88  # bootable
    assert entry.boot_media_type == entry.MEDIA_NO_EMUL
    assert entry.sector_count == 4  # isolinux: load 4 virtual sectors (2 KiB)
    boot_image = read(iso, "/isolinux/isolinux.bin")
    # isolinux needs the boot info table (bytes 8..64) patched in: the primary volume descriptor's LBA is 16.
    assert int.from_bytes(boot_image[8:12], "little") == 16
    assert boot_image[64:] == IsoSources().isolinux_bin.read_bytes()[64:]


def test_files_and_isolinux_config(built) -> None:  # type: ignore[no-untyped-def]
    iso, script, _ = built
    names = {c.rock_ridge.name().decode() for c in iso.list_children(rr_path="/isolinux") if c.rock_ridge is not None}
    assert {"isolinux.bin", "ldlinux.c32", "isolinux.cfg", "ipxe.lkrn", "bootstrap.ipxe", "boot.cat"} <= names
    assert read(iso, "/isolinux/ipxe.lkrn") == IsoSources().ipxe_lkrn.read_bytes()
    assert read(iso, "/isolinux/ldlinux.c32") == IsoSources().ldlinux_c32.read_bytes()
    cfg = read(iso, "/isolinux/isolinux.cfg").decode()
    assert "KERNEL ipxe.lkrn" in cfg and "INITRD bootstrap.ipxe" in cfg and "DEFAULT pvsfarm" in cfg
    assert read(iso, "/isolinux/bootstrap.ipxe").decode() == script
    # Plain ISO 9660 names too (isolinux without Rock Ridge matches them case-insensitively).
    assert read_iso9660(iso, "/ISOLINUX/BOOTSTRAP.IPXE;1") == script.encode()


def read_iso9660(iso: pycdlib.PyCdlib, path: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, iso_path=path)
    return out.getvalue()


def test_listed_script_does_plain_dhcp_then_logs_in_to_the_listed_servers() -> None:
    script = iso_script(SERVERS, 4000, 7, live=False)
    lines = script.splitlines()
    assert lines[0] == "#!ipxe" and script.count("#!ipxe") == 1
    dhcp_at = lines.index("dhcp && goto pvsfarm_online ||")
    chains = [i for i, line in enumerate(lines) if line.startswith("chain ")]
    assert dhcp_at < chains[0]
    assert "http://10.0.0.1:8080/boot?mac=" in lines[chains[0]] and "--timeout 4000" in lines[chains[0]]
    assert "http://10.0.0.2:8080/boot?mac=" in lines[chains[1]]
    assert "bootstrap.ipxe" not in script and "tftp" not in script.lower()


def test_live_script_asks_any_node_for_the_live_list() -> None:
    script = iso_script(SERVERS, 4000, 7, live=True)
    chains = [line for line in script.splitlines() if line.startswith("chain ")]
    assert chains == [f"chain --timeout 4000 {s.base_url}/bootstrap.ipxe && goto done || goto s{i + 1}"
                      for i, s in enumerate(SERVERS)]
    assert script.index("dhcp &&") < script.index("chain ")
    assert "(live mode)" in script


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="bootstrap names no servers"):
        iso_script([], 4000, 1, live=False)
    missing = IsoSources(ipxe_lkrn=tmp_path / "nope.lkrn")
    with pytest.raises(NotFound, match=r"nope\.lkrn.*apt-get install ipxe"):
        build_iso(iso_script(SERVERS, 4000, 1, live=False), 1, tmp_path / "x.iso", missing)
    with pytest.raises(InvalidInput):
        build_iso("echo no shebang", 1, tmp_path / "x.iso")
    assert not list(tmp_path.glob("*.iso")) and not list(tmp_path.glob(".*partial"))
