"""TFTP bootstrap server (RFC 1350 + options 2347/2348/2349/7440), read-only.

Layers: `wire` (codec), `session` (pure state machine of one read transfer),
`files` (name confinement under the root), `server` (asyncio adapter).
"""
