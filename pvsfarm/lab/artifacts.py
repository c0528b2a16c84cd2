"""Build, once and cached, what a QEMU target boots: a Debian kernel, a busybox
initramfs carrying the OS-stage agent (``agent.sh``) and nbd-client, and a
bootable vDisk made without loop mounts (lab REPORT Q4–Q6).

Everything comes from Debian packages: the kernel ``.deb`` is fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` (never installed into
the host); busybox-static, nbd-client (+ the shared libraries ``ldd`` names),
syslinux, mtools, dosfstools and fdisk from the host. Each artifact lives in
the cache directory under a name derived from the hash of everything that
went into it, so an edit to the agent or a new kernel rebuilds only what
changed; builds run under a lock, in a scratch directory renamed into place.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
"""Where ``agent.sh`` and ``udhcpc.script`` live (package data of ``pvsfarm.lab``)."""
CACHE_DIR = Path(os.environ.get("PVSFARM_E2E_CACHE", "/var/cache/pvsfarm-e2e"))
"""Shared by the e2e tests and ``pvsfarm demo`` (one build serves both)."""
BUILDER_VERSION = "3"
"""Bump when a recipe below changes in a way the hashed inputs do not show."""

MODULES = ("virtio_pci", "virtio_net", "e1000", "nbd", "vfat", "nls_cp437", "nls_ascii", "nls_utf8")
"""NICs QEMU offers (virtio, e1000), the NBD client, and FAT with what Debian's
defaults name (CONFIG_FAT_DEFAULT_CODEPAGE=437, IOCHARSET ascii, FAT_DEFAULT_UTF8)."""
HOST_BINARIES = (Path("/bin/busybox"), Path("/usr/sbin/nbd-client"))
DISK_MIB = 40
"""Kernel (~8 MiB) + initramfs (~7 MiB) + marker, with room to spare."""
STALE_AFTER_S = 3600
MARKER_NAME = "MARKER.BIN"
MARKER_BYTES = 1 << 20
MARKER_SEED = b"pvsfarm-e2e-marker-v1"
BUILD_TOOLS = ("apt-get", "dpkg-deb", "depmod", "cpio", "gzip", "sfdisk", "mkfs.vfat", "mcopy", "syslinux", "ldd")


class Unavailable(Exception):
    """The artifacts cannot be built here (a tool or the kernel package is missing)."""


@dataclass(frozen=True)
class Kernel:
    version: str
    """``uname -r`` of the kernel, e.g. ``6.1.0-56-amd64``."""
    tree: Path
    """The unpacked package: ``boot/vmlinuz-<version>``, ``lib/modules/<version>``."""

    @property
    def vmlinuz(self) -> Path:
        return self.tree / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.tree / "lib" / "modules" / self.version


@dataclass(frozen=True)
class BootArtifacts:
    kernel: Kernel
    initrd: Path
    disk: Path
    """The bootable vDisk: MBR, FAT16 partition 1 holding SYSLINUX, vmlinuz, initrd and the marker."""
    marker_sha256: str
    build_s: float
    """Seconds spent building (0 when everything came from the cache)."""


def run(*cmd: str | Path, cwd: Path | None = None, timeout_s: float = 300, stdin: bytes | None = None) -> str:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, input=stdin, capture_output=True, timeout=timeout_s,
                         env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {res.returncode}: "
                           f"{res.stderr.decode(errors='replace').strip()[-2000:]}")
    return res.stdout.decode(errors="replace")


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One builder at a time per cache directory (parallel pytest runs share it)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _building(final: Path) -> Iterator[Path]:
    """A scratch directory beside ``final``, renamed into place only when the build succeeded."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield scratch
        scratch.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def missing_tools() -> list[str]:
    return [t for t in BUILD_TOOLS if shutil.which(t) is None] + [str(p) for p in HOST_BINARIES if not p.exists()]


# -- kernel ------------------------------------------------------------------

def _kernel_package() -> tuple[str, str] | None:
    """(package, version) that Debian's ``linux-image-amd64`` points at; None if apt cannot say."""
    try:
        deps = run("apt-cache", "depends", "linux-image-amd64", timeout_s=60)
        name = next(line.split()[1] for line in deps.splitlines()
                    if line.strip().startswith("Depends: linux-image-"))
        show = run("apt-cache", "show", "--no-all-versions", name, timeout_s=60)
        version = next(line.split(None, 1)[1] for line in show.splitlines() if line.startswith("Version:"))
    except (RuntimeError, StopIteration, IndexError, subprocess.TimeoutExpired):
        return None
    return name, version


def _kernel_in(tree: Path) -> Kernel:
    (version,) = os.listdir(tree / "lib" / "modules")
    return Kernel(version, tree)


def kernel(cache: Path = CACHE_DIR) -> Kernel:
    """The Debian kernel, unpacked (not installed) into ``cache/kernel-<package>_<version>``."""
    package = _kernel_package()
    if package is None:
        cached = sorted(cache.glob("kernel-*"), key=lambda p: p.stat().st_mtime) if cache.exists() else []
        if cached:
            return _kernel_in(cached[-1])  # apt lists unavailable: the newest kernel already unpacked
        raise Unavailable("cannot resolve linux-image-amd64 with apt-cache (no apt lists?)")
    name, version = package
    final = cache / f"kernel-{name}_{version.replace(':', '%')}"
    with _locked(cache):
        if not final.exists():
            with _building(final) as scratch:
                try:
                    run("apt-get", "download", f"{name}={version}", cwd=scratch, timeout_s=600)
                except RuntimeError as exc:
                    raise Unavailable(f"apt-get download {name}: {exc}") from exc
                (deb,) = scratch.glob("*.deb")
                run("dpkg-deb", "-x", deb, scratch, timeout_s=300)
                deb.unlink()
                shutil.rmtree(scratch / "usr", ignore_errors=True)  # docs only
                found = _kernel_in(scratch)
                run("depmod", "-b", scratch, found.version)  # the .deb ships no modules.dep (lab Q4)
    return _kernel_in(final)


# -- initramfs ---------------------------------------------------------------

def _module_files(k: Kernel) -> list[str]:
    """Module paths (relative to the modules dir) for MODULES and their dependencies."""
    deps: dict[str, list[str]] = {}
    for line in (k.modules / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[Path(target).name.removesuffix(".ko").replace("-", "_")] = [target, *rest.split()]
    builtin = {Path(line).name.removesuffix(".ko").replace("-", "_")
               for line in (k.modules / "modules.builtin").read_text().split()}
    files: list[str] = []
    for module in MODULES:
        key = module.replace("-", "_")
        if key in builtin:
            continue
        if key not in deps:
            raise Unavailable(f"kernel {k.version} has no module {module}")
        files += [f for f in deps[key] if f not in files]
    return files


def _libraries(binary: Path) -> list[Path]:
    out = run("ldd", binary)
    return sorted({Path(word) for line in out.splitlines() for word in line.split() if word.startswith("/")})


def initramfs(k: Kernel, cache: Path = CACHE_DIR) -> Path:
    """busybox-static + the agent as /init + nbd-client with its libraries + MODULES."""
    agent, dhcp_hook = (HERE / "agent.sh").read_bytes(), (HERE / "udhcpc.script").read_bytes()
    libs = _libraries(HOST_BINARIES[1])
    key = _sha(BUILDER_VERSION, k.tree.name, agent, dhcp_hook, " ".join(MODULES),
               *(_file_sha(p) for p in HOST_BINARIES), *(_file_sha(p) for p in libs))
    final = cache / f"initrd-{key}.img"
    with _locked(cache):
        if final.exists():
            return final
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            root = Path(tmp) / "root"
            for d in ("bin", "sbin", "etc", "dev", "proc", "sys", "tmp", "mnt", "run"):
                (root / d).mkdir(parents=True)
            shutil.copy2(HOST_BINARIES[0], root / "bin" / "busybox")
            shutil.copy2(HOST_BINARIES[1], root / "sbin" / "nbd-client")
            (root / "init").write_bytes(agent)
            (root / "etc" / "udhcpc.script").write_bytes(dhcp_hook)
            os.chmod(root / "init", 0o755)
            os.chmod(root / "etc" / "udhcpc.script", 0o755)
            for lib in libs:
                dest = root / lib.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(lib.resolve(), dest)
                os.chmod(dest, 0o755)
            mods = root / "lib" / "modules" / k.version
            for rel in _module_files(k):
                (mods / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(k.modules / rel, mods / rel)
            for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
                shutil.copyfile(k.modules / name, mods / name)
            run("depmod", "-b", root, k.version)
            names = run("find", ".", cwd=root).encode()
            archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "--reproducible"], cwd=root,
                                     input=names, capture_output=True, check=True, timeout=120).stdout
            packed = subprocess.run(["gzip", "-1", "-n"], input=archive, capture_output=True, check=True,
                                    timeout=120).stdout  # gzip -1: fastest to unpack under TCG
            scratch = Path(tmp) / "initrd.img"
            scratch.write_bytes(packed)
            scratch.rename(final)
    return final


# -- the bootable vDisk ------------------------------------------------------

def marker_bytes() -> bytes:
    """MARKER_BYTES of deterministic noise: its sha256 is known without the disk."""
    blocks = (hashlib.sha256(MARKER_SEED + i.to_bytes(4, "big")).digest() for i in range(MARKER_BYTES // 32))
    return b"".join(blocks)


def syslinux_cfg(login_urls: tuple[str, ...]) -> str:
    """Kernel command line of the vDisk: the kernel cannot be told anything by iPXE after
    ``sanboot``, so the farm's login URLs travel here (the agent also learns the live farm
    from each login answer)."""
    append = (f"console=ttyS0 quiet pvsfarm.login={','.join(login_urls)} pvsfarm.marker={MARKER_NAME}")
    return "\n".join(["SERIAL 0 115200", "PROMPT 0", "TIMEOUT 0", "DEFAULT pvsfarm", "LABEL pvsfarm",
                      "  LINUX vmlinuz", "  INITRD initrd.img", f"  APPEND {append}", ""])


def vdisk(k: Kernel, initrd: Path, login_urls: tuple[str, ...], cache: Path = CACHE_DIR) -> Path:
    """MBR + FAT16 @1 MiB + SYSLINUX, built with sfdisk/mkfs.vfat --offset/mtools (lab Q6)."""
    cfg = syslinux_cfg(login_urls)
    mbr = Path("/usr/lib/syslinux/mbr/mbr.bin")
    ldlinux = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
    key = _sha(BUILDER_VERSION, k.tree.name, initrd.name, cfg, str(DISK_MIB), _file_sha(mbr), _file_sha(ldlinux),
               MARKER_SEED, str(MARKER_BYTES))
    final = cache / f"vdisk-{key}.img"
    with _locked(cache):
        if final.exists():
            return final
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            t = Path(tmp)
            img = t / "disk.img"
            with img.open("wb") as f:
                f.truncate(DISK_MIB << 20)
            run("sfdisk", "-q", img, stdin=b"start=2048, type=6, bootable\n")
            run("mkfs.vfat", "-F", "16", "-n", "PVSFARM", "-i", "50565346", "--offset", "2048", img,
                str((DISK_MIB - 1) * 1024))
            (t / "syslinux.cfg").write_text(cfg)
            (t / MARKER_NAME).write_bytes(marker_bytes())
            shutil.copyfile(k.vmlinuz, t / "vmlinuz")
            shutil.copyfile(initrd, t / "initrd.img")
            run("mcopy", "-i", f"{img}@@1M", t / "vmlinuz", t / "initrd.img", t / "syslinux.cfg", t / MARKER_NAME, "::/")
            run("syslinux", "--offset", str(1 << 20), "--install", img)
            with img.open("r+b") as f:
                f.write(mbr.read_bytes()[:440])
            img.rename(final)
    return final


def _prune(cache: Path, keep: set[Path]) -> None:
    """Drop artifacts of older inputs, unless used within the hour (a concurrent run may be
    using another agent version); what this run uses is touched to stay fresh."""
    cutoff = time.time() - STALE_AFTER_S
    with _locked(cache):
        for path in keep:
            os.utime(path)
        for pattern in ("initrd-*.img", "vdisk-*.img", "kernel-*"):
            for path in cache.glob(pattern):
                if path not in keep and path.stat().st_mtime < cutoff:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()


def build_all(login_urls: tuple[str, ...], cache: Path = CACHE_DIR) -> BootArtifacts:
    start = time.monotonic()
    missing = missing_tools()
    if missing:
        raise Unavailable("missing build tools: " + ", ".join(missing) + " (see tools/apt-packages.txt)")
    cache.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(cache))
    k = kernel(cache)
    initrd = initramfs(k, cache)
    disk = vdisk(k, initrd, login_urls, cache)
    built = set(os.listdir(cache)) - before
    _prune(cache, {k.tree, initrd, disk})
    return BootArtifacts(k, initrd, disk, hashlib.sha256(marker_bytes()).hexdigest(),
                         time.monotonic() - start if built else 0.0)


if __name__ == "__main__":
    import sys

    art = build_all(tuple(sys.argv[1:]) or ("http://10.77.0.1:8080", "http://10.77.0.2:8080"))
    print(art)
