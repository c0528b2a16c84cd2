import pytest
from hypothesis import given, strategies as st

from pvsfarm.addr import MacAddress
from pvsfarm.errors import InvalidInput


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("52:54:00:12:34:56", "52:54:00:12:34:56"), ("52-54-00-12-34-56", "52:54:00:12:34:56"),
     ("5254.0012.3456", "52:54:00:12:34:56"), ("525400123456", "52:54:00:12:34:56"),
     ("52:54:0:12:34:56", "52:54:00:12:34:56"), (" 52:54:00:AB:CD:EF ", "52:54:00:ab:cd:ef")],
)
def test_accepted_forms_are_canonical(text: str, canonical: str) -> None:
    assert str(MacAddress.parse(text)) == canonical


@pytest.mark.parametrize(
    ("text", "why"),
    [("zz:54:00:12:34:56", "hex"), ("52:54:00:12:34", "6"), ("01:00:5e:00:00:01", "multicast"),
     ("ff:ff:ff:ff:ff:ff", "multicast"), ("", "6"), ("52:54:00:12:34:56:78", "6"), ("52:54:00:123:4:56", "6")],
)
def test_rejected(text: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        MacAddress.parse(text)


@given(st.binary(min_size=6, max_size=6).filter(lambda b: not b[0] & 1))
def test_round_trip(packed: bytes) -> None:
    mac = MacAddress(packed)
    assert MacAddress.parse(str(mac)) == mac
