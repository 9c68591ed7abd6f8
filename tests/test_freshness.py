"""The replay and expiry guard: boundaries, memory bounds, caps."""

import pytest

from kvx.protocol import MAX_CLOCK_SKEW_MS, ErrorCode, Header, RemoteProtocolError
from kvx.trust import ReplayGuard

A = b"\x0a" * 32
B = b"\x0b" * 32
NOW = 1_000_000_000


def hdr(seq: int, iat: int = NOW, ttl: int = 1000) -> Header:
    return Header(iat=iat, exp=iat + ttl, seq=seq, to=b"\x00" * 32)


def code_of(guard: ReplayGuard, signer: bytes, header: Header, now: int) -> ErrorCode | None:
    try:
        guard.check(signer, header, now)
    except RemoteProtocolError as exc:
        return exc.code
    return None


def test_clock_skew_boundaries():
    g = ReplayGuard()
    assert code_of(g, A, hdr(1, iat=NOW + MAX_CLOCK_SKEW_MS), NOW) is None
    assert code_of(g, A, hdr(2, iat=NOW + MAX_CLOCK_SKEW_MS + 1), NOW) == ErrorCode.NOT_YET_VALID
    h = hdr(3)
    assert code_of(g, A, h, h.exp + MAX_CLOCK_SKEW_MS) is None
    assert code_of(g, A, hdr(4), hdr(4).exp + MAX_CLOCK_SKEW_MS + 1) == ErrorCode.EXPIRED


def test_replay_is_per_signer():
    g = ReplayGuard()
    assert code_of(g, A, hdr(1), NOW) is None
    assert code_of(g, B, hdr(1), NOW) is None
    assert code_of(g, A, hdr(1), NOW) == ErrorCode.REPLAYED
    # Out-of-order delivery is fine: sequence numbers need not arrive in order.
    assert code_of(g, A, hdr(0), NOW) is None


def test_expired_entries_are_forgotten_and_their_replays_still_refused():
    g = ReplayGuard()
    for seq in range(100):
        g.check(A, hdr(seq), NOW)
    assert len(g) == 100
    later = NOW + 1000 + MAX_CLOCK_SKEW_MS + 1
    g.check(B, hdr(0, iat=later), later)
    assert len(g) == 1  # A's statements are gone from memory ...
    assert code_of(g, A, hdr(5), later) == ErrorCode.EXPIRED  # ... and still refused


def test_a_signer_over_its_budget_loses_its_own_oldest_pairs_and_is_never_refused():
    g = ReplayGuard(max_per_signer=3, max_total=100)
    for seq in range(3):
        g.check(A, hdr(seq), NOW)
    assert code_of(g, A, hdr(3), NOW) is None  # accepted: A's oldest pair is forgotten
    assert len(g) == 3 and g.forgotten == 1
    assert code_of(g, A, hdr(0), NOW) is None  # forgotten, so only A itself could replay it
    assert code_of(g, A, hdr(3), NOW) == ErrorCode.REPLAYED  # the newer ones are still held


def test_a_full_memory_forgets_the_largest_holders_first_and_refuses_nobody():
    g = ReplayGuard(max_per_signer=1000, max_total=64)
    honest = b"\x0c" * 32
    for seq in range(3):
        g.check(honest, hdr(seq), NOW)
    for seq in range(61):  # one stranger fills the rest with long-lived statements
        g.check(A, hdr(seq, ttl=86_400_000), NOW)
    assert len(g) == 64
    assert code_of(g, B, hdr(0), NOW) is None  # a newcomer is accepted, not RATE_LIMITED
    assert len(g) <= 64
    for seq in range(3):  # the small holder kept every pair
        assert code_of(g, honest, hdr(seq), NOW) == ErrorCode.REPLAYED
    assert g.forgotten >= 1


def test_many_small_holders_are_trimmed_level_by_level():
    g = ReplayGuard(max_total=160)
    signers = [bytes([100 + i]) * 32 for i in range(40)]
    for i, signer in enumerate(signers):
        for seq in range(1 + i % 8):  # 1 to 8 pairs each
            g.check(signer, hdr(seq), NOW)
    while len(g) < 160:
        g.check(A, hdr(len(g)), NOW)
    g.check(B, hdr(0), NOW)
    assert len(g) <= 160 - 160 // 16 + 1
    # Who held one pair still holds it: the cut starts from the top.
    assert code_of(g, signers[0], hdr(0), NOW) == ErrorCode.REPLAYED


@pytest.mark.parametrize("ttl", [1, 1000])
def test_cap_frees_up_once_statements_expire(ttl):
    g = ReplayGuard(max_per_signer=1)
    g.check(A, hdr(0, ttl=ttl), NOW)
    later = NOW + ttl + MAX_CLOCK_SKEW_MS + 1
    assert code_of(g, A, hdr(1, iat=later), later) is None
