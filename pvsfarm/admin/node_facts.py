"""What a node reports about itself with each heartbeat, for `pvsfarm audit`.

The audit runs from the database alone, so every fact it judges a node by
must be written by that node: the subnet its DHCP serves, when it last saved
its offline cache, the inventory generation (devices, reservations) it
serves from, and whether its store is shared.
"""

from __future__ import annotations

import datetime as dt

from pvsfarm.config import NodeConfig
from pvsfarm.db.models import Server


def report_facts(server: Server, cfg: NodeConfig, generation: int, offline_saved_at: float) -> None:
    """Copy this node's facts onto its row (``offline_saved_at`` 0 = never saved)."""
    server.dhcp_subnet = cfg.dhcp.subnet if cfg.dhcp.interface is not None else None
    server.store_shared = cfg.store.shared
    server.inventory_generation = generation if generation >= 0 else None
    if offline_saved_at > 0:
        server.offline_cache_at = dt.datetime.fromtimestamp(offline_saved_at, dt.timezone.utc)
