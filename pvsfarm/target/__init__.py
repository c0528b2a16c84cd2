"""A simulated network-boot target (issue 4): DHCP → TFTP bootstrap → HTTP login → NBD reads,
with failover to another farm server when the streaming connection dies.

Library API (`pvsfarm.target.boot`): ``TargetSettings``, ``boot(settings) -> BootReport``
(asyncio), ``run_target(settings)`` (its own loop), ``stream_from_login(urls, settings)`` (login +
NBD with failover, no DHCP/TFTP: for loopback farms), ``BootReport``/``Failover``;
errors in `pvsfarm.target.errors`. CLI: ``pvsfarm target`` (`pvsfarm.target.cli`).
The step modules (`dhcp`, `tftp`, `login`, `nbd`) are usable on their own.
Nothing is imported here, so the CLI's start-up does not pay for aiohttp.
"""
