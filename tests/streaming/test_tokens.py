import pytest
from hypothesis import given, strategies as st

from pvsfarm.errors import RemoteProtocolError
from pvsfarm.streaming.tokens import ExportGrant, sign, verify

SECRET = b"k" * 32
GRANT = ExportGrant("ab" * 16, "52:54:00:12:34:56", "base", "n1", 1000)


def test_round_trip() -> None:
    assert verify(sign(GRANT, SECRET), SECRET, 1001, 60) == GRANT


@pytest.mark.parametrize("token", ["", "a", "a.b.c", "x" * 600, "!!!.???", sign(GRANT, b"other" * 8)])
def test_garbage_and_forgeries_rejected(token: str) -> None:
    with pytest.raises(RemoteProtocolError):
        verify(token, SECRET, 1001, 60)


def test_expired_and_future_rejected() -> None:
    token = sign(GRANT, SECRET)
    with pytest.raises(RemoteProtocolError, match="expired"):
        verify(token, SECRET, 1000 + 61, 60)
    with pytest.raises(RemoteProtocolError, match="expired"):
        verify(token, SECRET, 1000 - 400, 60)


@given(st.text(max_size=100))
def test_any_text_is_a_grant_or_a_remote_error(token: str) -> None:
    try:
        verify(token, SECRET, 1001, 60)
    except RemoteProtocolError:
        pass


def test_every_bit_matters() -> None:
    token = sign(GRANT, SECRET)
    body, tag = token.split(".")
    for i in range(len(body)):
        flipped = body[:i] + ("A" if body[i] != "A" else "B") + body[i + 1:]
        with pytest.raises(RemoteProtocolError):
            verify(f"{flipped}.{tag}", SECRET, 1001, 60)
