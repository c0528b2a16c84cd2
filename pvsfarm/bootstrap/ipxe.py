"""iPXE scripts: the bootstrap (try the farm's servers in order), the login
answers (boot this vDisk from that server) and the retry script. Pure text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAC_VAR = "${net0/mac:hexhyp}"
"""iPXE types the MAC as hex: ``:hexhyp`` gives ``52-54-00-12-34-56`` (``:uristring``
would render the raw bytes as text — seen in QEMU: ``mac=RT``)."""
RETRY_PAUSE_S = 10


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    base_url: str
    """``http://host:port`` of the server's login API."""


def _q(text: str) -> str:
    # iPXE expands ${...}; keep operator-supplied text from being interpreted.
    return text.replace("$", "").replace("\n", " ").replace("\r", " ")


def bootstrap_script(servers: Sequence[Endpoint], timeout_ms: int, version: int, *, live: bool = False) -> str:
    """Try each server's `/boot` in order with `chain --timeout`; loop after a pause."""
    lines = ["#!ipxe", f"# pvsfarm bootstrap v{version} ({'live' if live else 'listed'} mode)",
             f"echo pvsfarm: bootstrap v{version}, {len(servers)} server(s)", ":retry"]
    for i, server in enumerate(servers):
        lines += [
            f"echo pvsfarm: login via {_q(server.name)}",
            f"chain --timeout {timeout_ms} {server.base_url}/boot?mac={MAC_VAR}&bs={version} && goto done || goto s{i + 1}",
            f":s{i + 1}",
        ]
    lines += ["echo pvsfarm: no farm server answered; retrying", f"sleep {RETRY_PAUSE_S}", "goto retry", ":done", ""]
    return "\n".join(lines)


def sanboot_script(server: str, base_url: str, token: str, vdisk: str) -> str:
    return "\n".join([
        "#!ipxe",
        f"echo pvsfarm: {_q(vdisk)} from {_q(server)}",
        f"set pvsfarm-server {_q(server)}",
        f"sanboot --no-describe {base_url}/vdisk/{token} || goto failed",
        ":failed",
        "echo pvsfarm: sanboot failed; retrying login",
        f"sleep {RETRY_PAUSE_S}",
        f"chain {base_url}/boot?mac={MAC_VAR}",
        "",
    ])


def kernel_script(server: str, base_url: str, token: str, vdisk: str, nbd: str, cmdline: str) -> str:
    """Kernel + initrd from the vDisk's boot files; the OS attaches the vDisk over NBD."""
    args = f"{_q(cmdline)} pvsfarm.nbd={nbd} pvsfarm.export={token} pvsfarm.server={_q(server)} pvsfarm.login={base_url}"
    return "\n".join([
        "#!ipxe",
        f"echo pvsfarm: {_q(vdisk)} from {_q(server)} (kernel boot)",
        f"kernel {base_url}/vdisk/{token}/kernel {args.strip()} || goto failed",
        f"initrd {base_url}/vdisk/{token}/initrd || goto failed",
        "boot || goto failed",
        ":failed",
        f"sleep {RETRY_PAUSE_S}",
        f"chain {base_url}/boot?mac={MAC_VAR}",
        "",
    ])


def retry_script(reason: str, base_urls: Sequence[str], timeout_ms: int = 5000) -> str:
    """Shown to a target that may not boot (yet): says why, pauses, then tries
    the farm's other servers before this one again, so a node that answers
    but cannot assign never traps a target."""
    lines = ["#!ipxe", f"echo pvsfarm: cannot boot: {_q(reason)}", f"echo pvsfarm: retrying in {RETRY_PAUSE_S} s",
             f"sleep {RETRY_PAUSE_S}"]
    for i, url in enumerate(base_urls):
        lines += [f"chain --timeout {timeout_ms} {url}/boot?mac={MAC_VAR} && goto done || goto r{i + 1}", f":r{i + 1}"]
    lines += [f"sleep {RETRY_PAUSE_S}", f"chain {base_urls[-1]}/boot?mac={MAC_VAR}", ":done", ""]
    return "\n".join(lines)
