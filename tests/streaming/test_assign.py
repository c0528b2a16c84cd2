"""streaming/assign.py: the rules in its docstring, one by one."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from pvsfarm.errors import NoServerAvailable
from pvsfarm.streaming import assign as a
from pvsfarm.views import (BootMethod, BootstrapMode, BootstrapView, CacheType, CopyState, CopyView, ServerState,
                           ServerView, VDiskMode, VDiskView)

NOW = 1_000_000.0
DEAD_S = 5.0
VD = VDiskView("base", 1 << 20, VDiskMode.STANDARD, CacheType.SERVER, "sha256:aa", BootMethod.SANBOOT)


def server(name: str, load: int = 0, state: ServerState = ServerState.UP, age: float = 1.0) -> ServerView:
    return ServerView(name, "10.0.0.1", 8080, 10809, 69, state, NOW - age, load)


def copy(name: str, state: CopyState = CopyState.VERIFIED, digest: str = "sha256:aa") -> CopyView:
    return CopyView("base", name, f"/s/{name}", digest, state)


def boot(*names: str, mode: BootstrapMode = BootstrapMode.LISTED) -> BootstrapView:
    return BootstrapView(tuple(names), 5000, mode, 1)


def pick(servers, copies, bootstrap, **kw) -> str:  # type: ignore[no-untyped-def]
    return a.assign(VD, servers, copies, bootstrap, NOW, DEAD_S, **kw).name


def test_least_loaded_wins_ties_by_name() -> None:
    servers = [server("s3", 1), server("s1", 2), server("s2", 1)]
    copies = [copy("s1"), copy("s2"), copy("s3")]
    assert pick(servers, copies, boot("s1", "s2", "s3")) == "s2"


def test_only_servers_named_in_the_bootstrap_when_listed() -> None:
    servers = [server("s1", 5), server("s9", 0)]
    copies = [copy("s1"), copy("s9")]
    assert pick(servers, copies, boot("s1")) == "s1"
    assert pick(servers, copies, boot("s1", mode=BootstrapMode.LIVE)) == "s9"


@pytest.mark.parametrize("bad", [
    server("s1", 0, state=ServerState.DRAINING),
    server("s1", 0, state=ServerState.DOWN),
    server("s1", 0, age=DEAD_S + 0.1),
])
def test_dead_drained_or_silent_servers_are_skipped(bad: ServerView) -> None:
    assert pick([bad, server("s2", 9)], [copy("s1"), copy("s2")], boot("s1", "s2")) == "s2"


@pytest.mark.parametrize("bad_copy", [copy("s1", CopyState.STALE), copy("s1", CopyState.COPYING),
                                      copy("s1", digest="sha256:old"), None])
def test_only_verified_current_copies_count(bad_copy: CopyView | None) -> None:
    copies = [c for c in (bad_copy, copy("s2")) if c is not None]
    assert pick([server("s1", 0), server("s2", 9)], copies, boot("s1", "s2")) == "s2"


def test_current_server_is_kept_and_excluded_is_skipped() -> None:
    servers = [server("s1", 0), server("s2", 9)]
    copies = [copy("s1"), copy("s2")]
    assert pick(servers, copies, boot("s1", "s2"), current="s2") == "s2"
    assert pick(servers, copies, boot("s1", "s2"), exclude=frozenset({"s1"})) == "s2"
    assert pick(servers, copies, boot("s1", "s2"), extra_load={"s1": 10}) == "s2"


@pytest.mark.parametrize(("servers", "copies", "bootstrap", "why"), [
    ([server("s1")], [copy("s1")], boot(), "names no servers"),
    ([server("s1", age=60)], [copy("s1")], boot("s1"), "no live server"),
    ([server("s1")], [copy("s1", CopyState.STALE)], boot("s1"), "verified copy"),
])
def test_no_candidate_says_why(servers, copies, bootstrap, why) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NoServerAvailable, match=why):
        pick(servers, copies, bootstrap)


names = st.sampled_from(["s1", "s2", "s3", "s4"])
fleet = st.lists(st.tuples(names, st.integers(0, 50), st.sampled_from(list(ServerState)),
                           st.floats(0, 10)), unique_by=lambda t: t[0], min_size=1)


@given(fleet, st.lists(names, unique=True))
def test_deterministic_and_minimal(spec, listed) -> None:  # type: ignore[no-untyped-def]
    servers = [server(n, load, state, age) for n, load, state, age in spec]
    copies = [copy(n) for n, *_ in spec]
    bootstrap = boot(*listed)
    try:
        first = pick(servers, copies, bootstrap)
    except NoServerAvailable:
        assert not a.eligible(VD, servers, copies, bootstrap, NOW, DEAD_S)
        return
    assert pick(list(reversed(servers)), copies, bootstrap) == first  # order of input does not matter
    chosen = next(s for s in servers if s.name == first)
    for s in a.eligible(VD, servers, copies, bootstrap, NOW, DEAD_S):
        assert (chosen.load, chosen.name) <= (s.load, s.name)
    assert chosen.name in listed and a.is_live(chosen, NOW, DEAD_S)


def test_assign_module_is_pure() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(a))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"asyncio", "socket", "time", "sqlalchemy"}


def test_a_node_reporting_nbd_or_http_down_gets_no_targets() -> None:
    import dataclasses

    sick = dataclasses.replace(server("s1", 0), health="nbd down: timeout")
    tftp_only = dataclasses.replace(server("s3", 0), health="tftp down: timeout")
    copies = [copy("s1"), copy("s2"), copy("s3")]
    assert pick([sick, server("s2", 9)], copies, boot("s1", "s2")) == "s2"
    assert pick([tftp_only, server("s2", 9)], copies, boot("s3", "s2")) == "s3"  # TFTP gates DHCP only
