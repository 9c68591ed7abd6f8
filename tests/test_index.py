"""The advertisement index: longest-prefix lookup, duplicates, withdrawals, expiry, digests."""

from kvx.p2p import AdIndex
from kvx.protocol import Advertise, DataAddress, DigestEntry, Header, KVLayout, Withdraw
from kvx.trust import Identity, open_envelope, seal

LAYOUT = KVLayout(dtype="float16", layers=1, kv_heads=1, head_dim=8, block=16)
FP = b"\x0f" * 32
CHAIN = tuple(bytes([i]) * 32 for i in range(1, 6))
P, Q = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)


def ad(ident: Identity, blocks: int, price: int, seq: int, exp: int = 10_000, ns=None):
    msg = Advertise(
        fp=FP,
        layout=LAYOUT,
        blocks=CHAIN[:blocks],
        root=bytes([seq]) * 32,
        chunk=1 << 16,
        price=price,
        ctl="tcp://127.0.0.1:1",
        data=(DataAddress("tcp", "127.0.0.1:2"),),
        ns=ns,
    )
    return open_envelope(seal(ident, msg, Header(iat=0, exp=exp, seq=seq)))


def everyone(advert) -> bool:
    return True


def by_price(advert) -> tuple:
    return (advert.message.price,)


def test_the_longest_prefix_wins_then_the_cheapest():
    index = AdIndex()
    index.add(ad(P, 2, price=1, seq=1))
    index.add(ad(Q, 4, price=9, seq=2))
    index.add(ad(P, 4, price=5, seq=3))
    matched, found = index.lookup(FP, None, CHAIN, 8, usable=everyone, rank=by_price)
    assert matched == 4 and [a.seq for a in found] == [3, 2]
    matched, found = index.lookup(
        FP, None, (*CHAIN[:2], b"\xee" * 32), 8, usable=everyone, rank=by_price
    )
    assert matched == 2 and [a.seq for a in found] == [1, 3, 2]
    assert index.lookup(b"\x00" * 32, None, CHAIN, 8, usable=everyone, rank=by_price) == (0, [])
    assert index.lookup(FP, b"\x01" * 32, CHAIN, 8, usable=everyone, rank=by_price) == (0, [])


def test_unusable_providers_are_skipped():
    index = AdIndex()
    index.add(ad(P, 4, price=1, seq=1))
    index.add(ad(Q, 2, price=1, seq=2))
    matched, found = index.lookup(
        FP, None, CHAIN, 8, rank=by_price, usable=lambda a: a.signer != P.public_key
    )
    assert matched == 2 and [a.seq for a in found] == [2]


def test_duplicates_withdrawals_and_expiry():
    index = AdIndex()
    first = ad(P, 3, price=1, seq=1, exp=500)
    assert index.add(first) and not index.add(first)
    withdraw = open_envelope(seal(P, Withdraw(ad=1), Header(iat=0, exp=100, seq=2)))
    assert index.withdraw(withdraw) == (True, None)
    assert index.withdraw(withdraw) == (False, None)
    assert len(index) == 0 and not index.add(first)  # a late copy is not re-admitted
    assert index.holds((P.public_key, 2))
    index.add(ad(Q, 3, price=1, seq=3, exp=50))
    assert [a.seq for a in index.expire(now_ms=60)] == [3]
    index.expire(now_ms=600)  # the tombstone outlived the advertisement, then went
    assert index.add(first)


def test_digests_tell_what_each_side_lacks():
    ours, theirs = AdIndex(), AdIndex()
    a1, a2 = ad(P, 1, 1, seq=1), ad(Q, 1, 1, seq=2)
    ours.add(a1)
    theirs.add(a2)
    assert ours.missing_from(theirs.digest(lambda ns: True), lambda ns: True) == [a1.frame]
    assert ours.missing_from(theirs.digest(lambda ns: True), lambda ns: False) == []
    assert ours.lacks_any(theirs.digest(lambda ns: True))
    assert not ours.lacks_any([DigestEntry(P.public_key, 1)])
