"""The segment's IPv6 router advertiser lives in ``pvsfarm.lab.ra`` (shared with ``pvsfarm demo``);
re-exported here. Usage unchanged: ``python3 ra.py IFNAME [PREFIX]``."""

from pvsfarm.lab.ra import ALL_NODES, ALL_ROUTERS, ICMPV6_RA, ICMPV6_RS, PERIOD_S, advertisement, main

__all__ = ["ALL_NODES", "ALL_ROUTERS", "ICMPV6_RA", "ICMPV6_RS", "PERIOD_S", "advertisement", "main"]

if __name__ == "__main__":
    import sys

    main(*sys.argv[1:])
