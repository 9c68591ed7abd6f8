"""The advertisement index, sans-I/O: signed ADVERTISE/WITHDRAW statements by id, and from
each prefix-chain block hash to the advertisements that hold it.

A block hash names a whole prefix under one fingerprint and namespace (spec §7.3), so
the longest match of a buyer's chain is the last of its hashes that any usable
advertisement holds.

Signing keys cost nothing, so budgets per signer do not bound the whole: the index and
its withdrawals each have a total, and a full one makes room from its least proven,
heaviest holders (the standing the node gives each signer: strangers, then peers of its
table, never sellers it has bought from). Forgetting never resurrects: a signer that
lost statements to room-making gets a floor, and nothing it signed at or below the
floor is taken again (spec §13.2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from itertools import chain, islice

from kvx.protocol import Advertise, DigestEntry, ErrorCode, RemoteProtocolError, Withdraw
from kvx.trust import Statement, water_fill

AdId = tuple[bytes, int]  # (signer public key, seq)


class Standing(IntEnum):
    """How proven a signer is to this node; a full index makes room from the lowest."""

    STRANGER = 0
    PEER = 1  # a live peer of the table, heard from itself
    PROVEN = 2  # a seller this node's clients bought good KV from, or the node itself


@dataclass(frozen=True)
class Advert:
    signer: bytes
    seq: int
    message: Advertise
    frame: bytes
    exp_ms: int
    iat_ms: int

    @property
    def id(self) -> AdId:
        return (self.signer, self.seq)


@dataclass(frozen=True)
class _Tombstone:
    frame: bytes  # the WITHDRAW statement, relayed like an advertisement
    withdraw_id: AdId
    until_ms: int
    ns: bytes | None  # that of the withdrawn advertisement, when it was known
    iat_ms: int


ROOM = 16
"""A full index frees a sixteenth of its budget at once, so making room is rare."""


@dataclass(frozen=True)
class IndexBudget:
    """What the index holds at most (spec §13.1): frames are kept whole, since relaying
    needs the signed bytes, so bytes are budgeted per signer and in total."""

    ads: int = 100_000
    bytes: int = 256 << 20
    ads_per_signer: int = 4096
    bytes_per_signer: int = 16 << 20

    @property
    def floors(self) -> int:
        """Signers' floors kept at most; past it the oldest become the index's horizon."""
        return self.ads


class AdIndex:
    def __init__(
        self,
        budget: IndexBudget | None = None,
        standing: Callable[[bytes], Standing] = lambda signer: Standing.STRANGER,
    ) -> None:
        self.budget = budget if budget is not None else IndexBudget()
        self.standing = standing
        self.full = 0  # advertisements dropped because the whole index was full (a metric)
        self.forgotten = 0  # statements forgotten to make room (a metric)
        self._ads: dict[AdId, Advert] = {}
        self._by_signer: dict[bytes, dict[AdId, None]] = {}  # oldest first
        self._by_block: dict[bytes, set[AdId]] = {}
        self._by_root: dict[tuple[bytes, bytes], AdId] = {}  # (signer, root) -> newest ad
        self._held: dict[bytes, int] = {}  # signer -> bytes of the ads it holds here
        self._bytes = 0
        self._tombstones: dict[AdId, _Tombstone] = {}
        self._tombs_by: dict[bytes, int] = {}  # signer -> tombstones it holds here
        self._withdrawals: set[AdId] = set()
        self._floors: dict[bytes, tuple[int, int]] = {}  # signer -> (seq, iat) forgotten
        self._horizon_ms = -1  # statements issued at or before it: floors forgotten too

    def __len__(self) -> int:
        return len(self._ads)

    def __contains__(self, ad_id: AdId) -> bool:
        return ad_id in self._ads

    def ads(self) -> list[Advert]:
        return list(self._ads.values())

    def holds(self, ad_id: AdId) -> bool:
        """Whether this statement (an advertisement or a withdrawal) is already known."""
        return ad_id in self._ads or ad_id in self._tombstones or ad_id in self._withdrawals

    def public(self, ad_id: AdId) -> bool:
        """Whether this is an advertisement held here, of no private namespace."""
        ad = self._ads.get(ad_id)
        return ad is not None and ad.message.ns is None

    def floor(self, signer: bytes, seq: int, iat_ms: int) -> bool:
        """Whether a statement is at or below what was forgotten of its signer: it may
        have been superseded or withdrawn, so it is never taken again."""
        if iat_ms <= self._horizon_ms:
            return True
        floor = self._floors.get(signer)
        return floor is not None and seq <= floor[0]

    def add(self, statement: Statement) -> bool:
        """Index a verified ADVERTISE; False for a duplicate, a withdrawn, superseded or
        forgotten one, or a full index with nobody less proven to make room from (the
        node's problem, blamed on nobody).

        A newer advertisement of the same content by the same signer replaces the older
        (a refresh). Raises OVER_BUDGET when the signer holds its share already.
        """
        ad = statement.message
        assert isinstance(ad, Advertise)
        signer, seq = statement.signer, statement.header.seq
        ad_id = (signer, seq)
        if ad_id in self._ads or ad_id in self._tombstones:
            return False
        if self.floor(signer, seq, statement.header.iat):
            return False
        older = self._by_root.get((signer, ad.root))
        if older is not None and older[1] > seq:
            return False  # a refresh already replaced this one
        size = len(statement.frame)
        freed = self._ads[older] if older is not None else None
        ads = len(self._by_signer.get(signer, ())) - (freed is not None)
        used = self._held.get(signer, 0) - (len(freed.frame) if freed is not None else 0)
        if ads >= self.budget.ads_per_signer or used + size > self.budget.bytes_per_signer:
            raise RemoteProtocolError(
                ErrorCode.OVER_BUDGET,
                f"the signer holds {ads} ads, {used} bytes here already",
            )
        total = len(self._ads) - (freed is not None)
        total_bytes = self._bytes - (len(freed.frame) if freed is not None else 0) + size
        if (total >= self.budget.ads or total_bytes > self.budget.bytes) and not self._make_room(
            self.standing(signer), size
        ):
            self.full += 1
            return False
        if older is not None:
            self._remove(older)  # (unless making room took it already)
        advert = Advert(
            signer, seq, ad, statement.frame, statement.header.exp, statement.header.iat
        )
        self._ads[ad_id] = advert
        self._by_signer.setdefault(signer, {})[ad_id] = None
        self._by_root[(signer, ad.root)] = ad_id
        self._held[signer] = self._held.get(signer, 0) + size
        self._bytes += size
        for block in ad.blocks:
            self._by_block.setdefault(block, set()).add(ad_id)
        return True

    def signers(self) -> int:
        return len(self._by_signer)

    def withdrawals(self) -> int:
        return len(self._tombstones)

    @property
    def held_bytes(self) -> int:
        """Bytes of the advertisements held, against the budget's `bytes`."""
        return self._bytes

    def withdraw(self, statement: Statement) -> tuple[bool, bytes | None]:
        """Apply a verified WITHDRAW, kept until the advertisement would have expired.

        Returns whether it was new, and the withdrawn advertisement's namespace if known.
        """
        message = statement.message
        assert isinstance(message, Withdraw)
        target = (statement.signer, message.ad)
        withdraw_id = (statement.signer, statement.header.seq)
        if target in self._tombstones:
            return False, self._tombstones[target].ns
        signer = statement.signer
        if self.floor(signer, statement.header.seq, statement.header.iat):
            return False, None
        if self._tombs_by.get(signer, 0) >= self.budget.ads_per_signer:
            raise RemoteProtocolError(ErrorCode.OVER_BUDGET, "the signer holds its withdrawals")
        if len(self._tombstones) >= self.budget.ads:
            self._forget_tombstones(self.standing(signer))
        if len(self._tombstones) >= self.budget.ads:
            self.full += 1
            return False, None
        self._tombs_by[signer] = self._tombs_by.get(signer, 0) + 1
        removed = self._remove(target)
        until = max(statement.header.exp, removed.exp_ms if removed else 0)
        ns = removed.message.ns if removed else None
        tomb = _Tombstone(statement.frame, withdraw_id, until, ns, statement.header.iat)
        self._tombstones[target] = tomb
        self._withdrawals.add(withdraw_id)
        return True, ns

    def signer_left(self, signer: bytes, seq: int, iat_ms: int) -> int:
        """Forget every advertisement of a signer that left (spec §8.22), and take none it
        signed before it left: a late copy would offer a node that is gone. What it
        signs after it is back is taken as any other statement."""
        gone = self.drop_signer(signer)
        self._raise_floor(signer, seq, iat_ms)
        return gone

    def drop_signer(self, signer: bytes) -> int:
        """Forget every advertisement `signer` signed (a convicted liar's); how many."""
        gone = list(self._by_signer.get(signer, ()))
        for ad_id in gone:
            self._remove(ad_id)
        return len(gone)

    # ---- making room --------------------------------------------------------------------

    def _make_room(self, newcomer: Standing, size: int) -> bool:
        """Free a sixteenth of the budget from holders less proven than, or as proven as,
        the newcomer (never from proven sellers), heaviest first; whether it now fits."""
        standing = {s: self.standing(s) for s in self._by_signer}  # once: it costs a lookup
        for tier in range(min(newcomer, Standing.PEER) + 1):
            held = {s: len(ids) for s, ids in self._by_signer.items() if standing[s] == tier}
            need = len(self._ads) - (self.budget.ads - max(1, self.budget.ads // ROOM))
            need = max(need, 1 if self._bytes + size > self.budget.bytes else 0)
            for signer, cut in water_fill(held, need).items():
                for ad_id in list(self._by_signer[signer])[:cut]:
                    advert = self._remove(ad_id)
                    assert advert is not None
                    self._forget(signer, advert.seq, advert.iat_ms)
            if len(self._ads) < self.budget.ads and self._bytes + size <= self.budget.bytes:
                return True
        return False

    def _forget_tombstones(self, newcomer: Standing) -> None:
        """Free a sixteenth of the withdrawals' budget, as `_make_room` does for ads; the
        floor keeps each forgotten withdrawal's advertisement out."""
        need = len(self._tombstones) - (self.budget.ads - max(1, self.budget.ads // ROOM))
        standing = {s: self.standing(s) for s in self._tombs_by}
        for tier in range(min(newcomer, Standing.PEER) + 1):
            held = {s: n for s, n in self._tombs_by.items() if standing[s] == tier}
            cuts = water_fill(held, need)
            for target in [t for t in self._tombstones if cuts.get(t[0], 0) > 0]:
                if cuts[target[0]] > 0:
                    cuts[target[0]] -= 1
                    need -= 1
                    tomb = self._drop_tombstone(target)
                    self._forget(target[0], tomb.withdraw_id[1], tomb.iat_ms)
            if need <= 0:
                return

    def _forget(self, signer: bytes, seq: int, iat_ms: int) -> None:
        """Raise the signer's floor over a statement forgotten to make room."""
        self.forgotten += 1
        self._raise_floor(signer, seq, iat_ms)

    def _raise_floor(self, signer: bytes, seq: int, iat_ms: int) -> None:
        floor = self._floors.pop(signer, (-1, -1))
        self._floors[signer] = (max(floor[0], seq), max(floor[1], iat_ms))  # newest last
        if len(self._floors) > self.budget.floors:
            # Too many floors to keep: the oldest half become the horizon, before which
            # nothing is taken from anyone (an honest signer's refreshes come after it).
            for old in list(self._floors)[: len(self._floors) // 2]:
                self._horizon_ms = max(self._horizon_ms, self._floors.pop(old)[1])

    def _remove(self, ad_id: AdId) -> Advert | None:
        advert = self._ads.pop(ad_id, None)
        if advert is not None:
            key = (advert.signer, advert.message.root)
            if self._by_root.get(key) == ad_id:
                del self._by_root[key]
            ids = self._by_signer[advert.signer]
            del ids[ad_id]
            self._held[advert.signer] -= len(advert.frame)
            self._bytes -= len(advert.frame)
            if not ids:
                del self._by_signer[advert.signer], self._held[advert.signer]
            for block in advert.message.blocks:
                holders = self._by_block.get(block)
                if holders is not None:
                    holders.discard(ad_id)
                    if not holders:
                        del self._by_block[block]
        return advert

    def expire(self, now_ms: int) -> list[Advert]:
        gone = [a for a in self._ads.values() if a.exp_ms < now_ms]
        for advert in gone:
            self._remove(advert.id)
        for target in [t for t, s in self._tombstones.items() if s.until_ms < now_ms]:
            self._drop_tombstone(target)
        return gone

    def _drop_tombstone(self, target: AdId) -> _Tombstone:
        tomb = self._tombstones.pop(target)
        self._withdrawals.discard(tomb.withdraw_id)
        left = self._tombs_by[target[0]] - 1
        if left:
            self._tombs_by[target[0]] = left
        else:
            del self._tombs_by[target[0]]
        return tomb

    def lookup(
        self,
        fp: bytes,
        ns: bytes | None,
        chain: tuple[bytes, ...],
        limit: int,
        *,
        usable: Callable[[Advert], bool],
        rank: Callable[[Advert], tuple[float, ...]],
    ) -> tuple[int, list[Advert]]:
        """The longest prefix of `chain` any usable advertisement holds, and the best of them."""
        for matched in range(len(chain), 0, -1):
            ids = self._by_block.get(chain[matched - 1], ())
            found = [
                a
                for a in (self._ads[i] for i in ids)
                if a.message.fp == fp
                and a.message.ns == ns
                # The hash names a whole prefix, so it must stand at the same position.
                and len(a.message.blocks) >= matched
                and a.message.blocks[matched - 1] == chain[matched - 1]
                and usable(a)
            ]
            if found:
                return matched, sorted(found, key=rank)[:limit]
        return 0, []

    def digest(self, may_see: Callable[[bytes | None], bool]) -> tuple[DigestEntry, ...]:
        """What we hold, as ids, of what the recipient may see (`may_see(ns)`: a private
        namespace's ids are for its proven members only)."""
        ids = [a.id for a in self._ads.values() if may_see(a.message.ns)]
        ids += [t.withdraw_id for t in self._tombstones.values() if may_see(t.ns)]
        return tuple(DigestEntry(key=k, seq=s) for k, s in ids[:4096])

    def missing_from(
        self,
        have: Iterable[DigestEntry],
        may_see: Callable[[bytes | None], bool],
        limit: int | None = None,
    ) -> list[bytes]:
        """Frames of what we hold that a peer's digest does not list and that it may see
        (`may_see(ns)`: private namespaces go to proven members only), the first `limit`
        of them: a DIGEST is answered a page at a time, so the rest is not gathered."""
        theirs = {(e.key, e.seq) for e in have}
        ads = (a.frame for a in self._ads.values() if a.id not in theirs and may_see(a.message.ns))
        withdrawals = (
            t.frame
            for t in self._tombstones.values()
            if t.withdraw_id not in theirs and may_see(t.ns)
        )
        return list(islice(chain(ads, withdrawals), limit))

    def lacks_any(self, have: Iterable[DigestEntry]) -> bool:
        """Whether a peer's digest lists something we do not hold."""
        return any(not self.holds((e.key, e.seq)) for e in have)
