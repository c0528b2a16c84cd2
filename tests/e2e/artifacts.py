"""The e2e boot artifacts: built by ``pvsfarm.lab.artifacts`` (shared with ``pvsfarm demo``);
re-exported here for the e2e tests. ``python -m pvsfarm.lab.artifacts [LOGIN_URL...]`` builds them."""

from pvsfarm.lab.artifacts import (BUILD_TOOLS, BUILDER_VERSION, CACHE_DIR, DISK_MIB, HOST_BINARIES, MARKER_BYTES,
                                   MARKER_NAME, MARKER_SEED, MODULES, BootArtifacts, Kernel, Unavailable, build_all,
                                   initramfs, kernel, marker_bytes, missing_tools, run, syslinux_cfg, vdisk)

__all__ = ["BUILD_TOOLS", "BUILDER_VERSION", "CACHE_DIR", "DISK_MIB", "HOST_BINARIES", "MARKER_BYTES", "MARKER_NAME",
           "MARKER_SEED", "MODULES", "BootArtifacts", "Kernel", "Unavailable", "build_all", "initramfs", "kernel",
           "marker_bytes", "missing_tools", "run", "syslinux_cfg", "vdisk"]
