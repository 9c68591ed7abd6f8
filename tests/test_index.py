"""The advertisement index: longest-prefix lookup, duplicates, withdrawals, expiry, digests."""

from kvx.p2p._index import AdIndex
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


# ---- totals that prefer the proven, and forgetting that never resurrects (§13.2) ------

from kvx.p2p._index import IndexBudget, Standing  # noqa: E402


def big(ident: Identity, seq: int, root: int | None = None, iat: int = 0):
    """An ad of its own root (or of `root`, to refresh one), 10 s to live."""
    msg = Advertise(
        fp=FP,
        layout=LAYOUT,
        blocks=CHAIN[:1],
        root=(seq if root is None else root).to_bytes(32, "big"),
        chunk=1 << 16,
        price=1,
        ctl="tcp://127.0.0.1:1",
        data=(DataAddress("tcp", "127.0.0.1:2"),),
    )
    return open_envelope(seal(ident, msg, Header(iat=iat, exp=10_000, seq=seq)))


def withdraw(ident: Identity, ad_seq: int, seq: int):
    return open_envelope(seal(ident, Withdraw(ad=ad_seq), Header(iat=0, exp=10_000, seq=seq)))


SYBILS = [Identity.generate() for _ in range(4)]
HONEST, FRIEND, SELLER = Identity.generate(), Identity.generate(), Identity.generate()
RANK = {FRIEND.public_key: Standing.PEER, SELLER.public_key: Standing.PROVEN}


def filled(per_sybil: int = 25) -> AdIndex:
    index = AdIndex(
        IndexBudget(ads=100, ads_per_signer=50), lambda k: RANK.get(k, Standing.STRANGER)
    )
    for i, sybil in enumerate(SYBILS):
        for seq in range(1, per_sybil + 1):
            assert index.add(big(sybil, 1000 * i + seq))
    assert len(index) == 100
    return index


def held_by(index: AdIndex, ident: Identity) -> int:
    return sum(a.signer == ident.public_key for a in index.ads())


def test_a_full_index_makes_room_from_the_heaviest_strangers_for_a_newcomer():
    index = filled()
    assert index.add(big(HONEST, 1))  # a stranger of one ad: a sybil's oldest goes
    assert len(index) <= 100 and held_by(index, HONEST) == 1
    assert index.forgotten >= 1 and all(held_by(index, s) < 25 for s in SYBILS[:1])
    for seq in range(2, 200):  # a flood of the sybils' own: the honest ad stays
        index.add(big(SYBILS[0], 5000 + seq))
    assert held_by(index, HONEST) == 1 and len(index) <= 100


def test_peers_evict_strangers_and_nobody_evicts_a_proven_seller():
    index = AdIndex(
        IndexBudget(ads=10, ads_per_signer=10), lambda k: RANK.get(k, Standing.STRANGER)
    )
    for seq in range(1, 6):
        assert index.add(big(SELLER, seq))
        assert index.add(big(FRIEND, 100 + seq))
    assert not index.add(big(HONEST, 1))  # a stranger cannot push out a peer or a seller
    for seq in range(6, 9):
        index.add(big(FRIEND, 100 + seq))  # a peer makes room among peers, heaviest first
    assert held_by(index, SELLER) == 5 and len(index) <= 10
    assert index.full >= 1


def test_a_forgotten_superseded_ad_is_never_taken_again():
    index = AdIndex(IndexBudget(ads=10, ads_per_signer=20))
    first, refresh = big(HONEST, 1, root=10**6), big(HONEST, 2, root=10**6)
    assert index.add(first) and index.add(refresh)  # the refresh replaces the first
    for seq in range(3, 14):  # the index fills with the same signer: its oldest go
        index.add(big(HONEST, seq))
    assert (HONEST.public_key, 2) not in index  # the refresh was forgotten...
    assert not index.add(first)  # ...and what it superseded does not come back


def test_a_forgotten_withdrawal_never_lets_its_advertisement_back():
    index = AdIndex(IndexBudget(ads=10, ads_per_signer=10))
    target = big(HONEST, 1)
    assert index.add(target)
    assert index.withdraw(withdraw(HONEST, 1, 2))[0]
    for i, sybil in enumerate(SYBILS):  # withdrawals in total past the budget
        for seq in range(1, 5):
            index.withdraw(withdraw(sybil, 10_000 + seq, 100 * i + seq))
    assert index.withdrawals() <= 10
    for seq in range(3, 20):  # the honest signer's own, to force its tombstone out too
        index.withdraw(withdraw(HONEST, 50_000 + seq, seq))
    assert not index.holds((HONEST.public_key, 1)) and not index.holds((HONEST.public_key, 2))
    assert not index.add(target)  # withdrawn, the withdrawal forgotten, and still refused
