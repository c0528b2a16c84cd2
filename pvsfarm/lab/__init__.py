"""Real targets for the lab: what a QEMU VM boots from the farm (Debian kernel, a busybox
initramfs with nbd-client and the OS-stage agent, a bootable vDisk with a marker file),
the IPv6 router advertiser of the boot segment, and the VM path of ``pvsfarm demo``.

Used by ``pvsfarm demo`` and by the QEMU end-to-end tests (``tests/e2e``)."""

from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent
RA_SCRIPT = LAB_DIR / "ra.py"
"""Standalone (stdlib only): run as ``python3 ra.py IFNAME`` inside the segment's namespace."""
