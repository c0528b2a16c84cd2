"""SpinBackoff: the busy-poll back-off shared by TFTP transfers and NBD workers."""

from pvsfarm.backoff import MAX_BACKOFF, SpinBackoff


def skips(b: SpinBackoff) -> int:
    n = 0
    while b.skipping():
        n += 1
    return n


def test_time_outs_double_the_skips_up_to_the_cap_and_a_catch_starts_over() -> None:
    b = SpinBackoff()
    assert skips(b) == 0
    seen = []
    for _ in range(9):
        b.timed_out()
        seen.append(skips(b))
    assert seen == [1, 2, 4, 8, 16, 32, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]
    b.timed_out()
    b.caught()
    assert skips(b) == 0
    b.timed_out()
    assert skips(b) == 1
