"""Re-open, in an NBD worker process, a device the node's main process opened.

Devices that can be re-opened elsewhere describe themselves with
``handoff_spec()`` (a small JSON-able dict: kind, paths, file identities);
`attach` turns such a dict back into a device. The main process keeps its own
instance open for as long as the connection lives, so its flock (the fencing
against other nodes) stays held; attached instances take no flock.
"""

from __future__ import annotations

from typing import Any

from pvsfarm.errors import StoreError
from pvsfarm.store.device import BlockDevice
from pvsfarm.store.images import BaseImage, PrivateImage
from pvsfarm.store.writecache import WriteCache


def attach(spec: dict[str, Any]) -> BlockDevice:
    """The device ``spec`` describes; `StoreError` if its files changed since."""
    kind = spec.get("kind")
    if kind == "base":
        return BaseImage(spec["path"], attach=spec["ident"])
    if kind == "private":
        return PrivateImage(spec["path"], attach=spec["ident"])
    if kind == "cache":
        base = BaseImage(spec["base"], attach=spec["base_ident"])
        try:
            cache = WriteCache.attach(base, spec["cache"], base_id=spec["base_id"], ident=spec["ident"])
        except BaseException:
            base.close()
            raise
        cache._owns_base = True  # noqa: SLF001 - the attached cache closes the base it was given
        return cache
    if kind == "file":
        from pvsfarm.streaming.nbd.backend import FileDevice

        return FileDevice(spec["path"], read_only=bool(spec["read_only"]), attach=spec["ident"])
    raise StoreError(f"cannot attach a device of kind {kind!r}")
