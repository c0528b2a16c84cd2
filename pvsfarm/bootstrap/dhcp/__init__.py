"""DHCP for the boot path: static reservations from the device table, PXE/iPXE
boot information, optional ProxyDHCP.

``wire`` (codec) and ``session`` (decisions) are pure; ``server`` is the
asyncio adapter (`start_dhcp_server`). Import from the submodules: importing
this package must not pull in asyncio.
"""
