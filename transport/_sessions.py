"""The seller's offers: which streams it has agreed to serve, each claimable once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from kvx.protocol import ErrorCode, RemoteProtocolError, Transfer, byte_view

from ._verify import Expected


@dataclass(frozen=True)
class Offer:
    """One accepted quote, ready to stream: the payload and the chunk list its root signs."""

    quote: bytes
    token: bytes
    buyer: bytes  # the buyer's Ed25519 public key: only it may open the stream
    payload: memoryview  # the whole payload the root covers
    hashes: tuple[bytes, ...]
    expected: Expected
    expires_ms: int
    key: bytes | None = None  # the deal's channel key: the stream is sealed (§9.6)

    @classmethod
    def build(
        cls,
        *,
        quote: bytes,
        token: bytes,
        buyer: bytes,
        payload: object,
        hashes: list[bytes],
        expected: Expected,
        expires_ms: int,
        key: bytes | None = None,
    ) -> Offer:
        view = byte_view(payload)
        if len(view) != expected.size or len(hashes) != expected.chunks:
            raise ValueError("payload or chunk list does not match the expected size")
        return cls(quote, token, buyer, view, tuple(hashes), expected, expires_ms, key)

    def chunk(self, index: int) -> memoryview:
        start = index * self.expected.chunk
        return self.payload[start : start + self.expected.length(index)]


OFF_KEPT = 4096
"""Tokens of deals called off whose reason a late TRANSFER is told; older ones are
refused as unknown."""


def _bad_token(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_TOKEN, detail)


class Sessions:
    """Offers by token. Tokens are single-use: a claimed or expired one is gone for good.

    A buyer sends ACCEPT on the control channel and opens the data channel at once, so a
    TRANSFER may overtake its ACCEPT: a token that was quoted (`expect`) but is not yet
    authorised is waited for, briefly, before it is refused.
    """

    def __init__(self, accept_wait_s: float = 5.0) -> None:
        self.accept_wait_s = accept_wait_s
        self._offers: dict[bytes, Offer] = {}
        self._expected: set[bytes] = set()
        self._off: OrderedDict[bytes, str] = OrderedDict()  # token -> why its deal is off
        self._streaming: dict[bytes, bytes] = {}  # quote id -> buyer key, claimed, not ended
        self._changed = threading.Condition()  # streams are served from worker threads

    def expect(self, token: bytes) -> None:
        """A quote carrying `token` went out; its ACCEPT may follow."""
        with self._changed:
            self._expected.add(token)

    def forget(self, token: bytes, why: str) -> None:
        """The deal is off (rejected, expired, or its payload failed its root): a TRANSFER
        that waits for its ACCEPT is refused now, not when its wait runs out, and told why."""
        with self._changed:
            self._expected.discard(token)
            self._offers.pop(token, None)
            self._off[token] = why
            while len(self._off) > OFF_KEPT:
                self._off.popitem(last=False)
            self._changed.notify_all()

    def authorize(self, offer: Offer) -> None:
        with self._changed:
            self._expected.discard(offer.token)
            self._offers[offer.token] = offer
            self._changed.notify_all()

    def claim(self, transfer: Transfer, signer: bytes, now_ms: int) -> Offer:
        """The offer a TRANSFER opens, or BAD_TOKEN; the token is spent once it matched."""
        with self._changed:
            self._changed.wait_for(
                lambda: transfer.token not in self._expected, timeout=self.accept_wait_s
            )
            offer = self._offers.get(transfer.token)
            if offer is None:
                why = self._off.get(transfer.token)
                if why is not None:
                    raise _bad_token(f"the deal is off: {why}")
                raise _bad_token("unknown, unaccepted or already used session token")
            if offer.quote != transfer.quote or offer.buyer != signer:
                raise _bad_token("the token belongs to another quote or buyer")
            del self._offers[transfer.token]
        if now_ms > offer.expires_ms:
            raise _bad_token("the session token has expired")
        if max(transfer.first, transfer.last or 0) >= offer.expected.needed:
            raise RemoteProtocolError(
                ErrorCode.INVALID_FIELD, "first or last is past the delivery's last chunk"
            )
        with self._changed:
            self._streaming[offer.quote] = offer.buyer
        return offer

    def streaming(self, quote: bytes) -> bytes | None:
        """The buyer of the deal whose stream was claimed and whose end is not yet booked
        (`ended`), if this quote's is."""
        with self._changed:
            return self._streaming.get(quote)

    def ended(self, quote: bytes) -> None:
        """The stream of this deal ended, and its end is booked."""
        with self._changed:
            self._streaming.pop(quote, None)

    def serving(self, root: bytes) -> Offer | None:
        """An accepted offer of the payload with this root, if one waits for its stream:
        deals of one payload share its bytes, not one copy each."""
        with self._changed:
            return next((o for o in self._offers.values() if o.expected.root == root), None)

    def expired(self, now_ms: int) -> list[Offer]:
        """Remove and return the accepted offers whose token's life passed unclaimed."""
        with self._changed:
            gone = [o for o in self._offers.values() if o.expires_ms < now_ms]
            for offer in gone:
                del self._offers[offer.token]
        return gone

    def __len__(self) -> int:
        return len(self._offers)
