"""Cases for spec §8.10 to §10: quotes, the data channel, the quote-state table, receipts.

They buy the conformance fixture from the target (spec/README.md), and are skipped with
the reason when it does not hold it.
"""

from __future__ import annotations

import contextlib
import os
import threading

import blake3
import nacl.bindings

from kvx.protocol import (
    Accept,
    Advertise,
    Error,
    ErrorCode,
    Lookup,
    LookupResult,
    Quote,
    QuoteRequest,
    Receipt,
    Reject,
    Transfer,
)
from kvx.trust import Statement, open_envelope

from ._case import (
    FIXTURE_CHAIN,
    FIXTURE_FP,
    FIXTURE_PAYLOAD,
    LONG_FIXTURE_CHAIN,
    LONG_FIXTURE_FP,
    LONG_FIXTURE_PAYLOAD,
    case,
    refused,
    seq_of,
    signed_body,
)
from ._data import Stream, open_stream
from ._peer import Failed, Session, Skipped, now_ms


def _quote(s: Session, fp: bytes = FIXTURE_FP) -> Statement:
    ask = s.frame(
        QuoteRequest(fp=fp, blocks=tuple(FIXTURE_CHAIN), transports=("tcp",), max_price=10**15)
    )
    s.send(ask)
    answer = s.answer(seq_of(ask))
    if answer is None:
        raise Failed("QUOTE_REQUEST was not answered")
    if isinstance(answer.message, Error):
        if (
            answer.message.code in (ErrorCode.NOT_FOUND, ErrorCode.FINGERPRINT_MISMATCH)
            and fp == FIXTURE_FP
        ):
            raise Skipped("the target does not hold the conformance fixture (spec/README.md)")
        raise Failed(f"ERROR {answer.message.code}: {answer.message.msg}")
    return answer


def _deal(s: Session) -> Quote:
    """A QUOTE for the fixture, accepted."""
    s.hello()
    quote = _quote(s).message
    if not isinstance(quote, Quote) or quote.blocks != 3:
        raise Failed(f"expected a QUOTE for 3 blocks, got {quote!r}")
    s.send(s.frame(Accept(quote=quote.quote, price=quote.price, root=quote.root)))
    return quote


def _stream(s: Session, q: Quote, *, token: bytes | None = None, first: int = 0) -> Stream:
    transfer = s.frame(Transfer(quote=q.quote, token=token or q.token, first=first))
    return open_stream(q.data, transfer, q, _payer(s, q))


def _quote_for(s: Session, fp: bytes, chain: list[bytes], fixture: str, **over) -> Quote:
    """A QUOTE for a fixture, not yet accepted; Skipped when the target does not hold it."""
    s.hello()
    request = QuoteRequest(
        fp=fp, blocks=tuple(chain), transports=("tcp",), max_price=10**15, **over
    )
    answer = _ask(s, request).message
    if isinstance(answer, Error) and answer.code in (
        ErrorCode.NOT_FOUND,
        ErrorCode.FINGERPRINT_MISMATCH,
    ):
        raise Skipped(f"the target does not hold the {fixture} (spec/README.md)")
    if not isinstance(answer, Quote):
        raise Failed(f"a QUOTE_REQUEST for the {fixture} was answered {answer!r}")
    return answer


def _whole(stream: Stream, q: Quote, payload: bytes) -> None:
    """The stream ended with END, and the bytes it verified are the fixture's."""
    if stream.fault or not stream.ended:
        raise Failed(f"the stream failed: {stream.fault or 'no END'}")
    if stream.payload(q.deliver) != payload[: q.deliver]:
        raise Failed("verified bytes differ from the fixture")


def _sealed_quote(s: Session) -> Quote:
    """A QUOTE for the fixture asked for sealed (§9.6), not yet accepted."""
    answer = _quote_for(s, FIXTURE_FP, FIXTURE_CHAIN, "conformance fixture", seal=True)
    if answer.kx is None:
        raise Failed("the QUOTE for a request with seal carries no kx")
    return answer


def _sealed_deal(s: Session) -> tuple[Quote, bytes]:
    """A sealed QUOTE, accepted with a key of ours: it and the deal's key (§9.6)."""
    q = _sealed_quote(s)
    secret = os.urandom(32)
    kx = nacl.bindings.crypto_scalarmult_base(secret)
    shared = nacl.bindings.crypto_scalarmult(secret, q.kx)
    material = shared + q.quote + q.kx + kx
    key = blake3.blake3(material, derive_key_context="kvx 0.3 data channel key").digest()
    s.send(s.frame(Accept(quote=q.quote, price=q.price, root=q.root, kx=kx)))
    return q, key


def _refused_stream(stream: Stream, code: ErrorCode) -> None:
    if stream.chunks:
        raise Failed(f"{len(stream.chunks)} chunks were streamed")
    codes = [st.message.code for st in stream.controls if isinstance(st.message, Error)]
    if codes != [code]:
        raise Failed(f"the seller answered ERROR {codes or 'nothing'}, not {code.name}")


@case(
    "10.1/1",
    "MUST",
    "QUOTE_REQUEST, QUOTE, ACCEPT, TRANSFER, RECEIPT: the payload arrives "
    "whole and matches the signed content root",
)
def _(s: Session) -> None:
    q = _deal(s)
    stream = _stream(s, q)
    _whole(stream, q, FIXTURE_PAYLOAD)
    receipt = s.frame(
        Receipt(quote=q.quote, seller=s.target_id, root=q.root, bytes=q.deliver, price=q.price)
    )
    s.send(receipt)
    for st in s.receive(1.0):
        if isinstance(st.message, Error):
            raise Failed(f"the RECEIPT was refused: {st.message.msg}")


@case(
    "9.6/1",
    "MUST",
    "a QUOTE_REQUEST with seal is quoted with kx, and every frame of its stream after the "
    "TRANSFER opens with the key of §9.6: the payload arrives whole and never in clear",
)
def _(s: Session) -> None:
    q, key = _sealed_deal(s)
    transfer = s.frame(Transfer(quote=q.quote, token=q.token, first=0))
    stream = open_stream(q.data, transfer, q, _payer(s, q), key=key)
    _whole(stream, q, FIXTURE_PAYLOAD)
    payload = FIXTURE_PAYLOAD[: q.deliver]
    seen = bytes(stream.wire)
    if any(payload[i : i + 32] in seen for i in range(0, len(payload) - 32, 256)):
        raise Failed("a piece of the payload crossed the wire in clear")


@case("9.6/2", "MUST", "an ACCEPT without kx of a QUOTE with kx is UNKNOWN_QUOTE")
def _(s: Session) -> None:
    q = _sealed_quote(s)
    refused(s, s.frame(_accept(q)), ErrorCode.UNKNOWN_QUOTE)


@case("9.2/4", "MUST", "after END the seller sends nothing more and closes the connection")
def _(s: Session) -> None:
    stream = _stream(s, _deal(s))
    if not (stream.ended and stream.closed) or stream.fault:
        raise Failed(stream.fault or "the connection stayed open after END")


@case(
    "10.2/1",
    "MUST",
    "a QUOTE_REQUEST for another fingerprint is refused before any "
    "transfer, with FINGERPRINT_MISMATCH or NOT_FOUND",
)
def _(s: Session) -> None:
    answer = _quote_error(s, blake3.blake3(b"another model").digest())
    if answer not in (ErrorCode.FINGERPRINT_MISMATCH, ErrorCode.NOT_FOUND):
        raise Failed(f"answered {answer}")


def _refusal(s: Session, **over) -> ErrorCode | str:
    """The code a QUOTE_REQUEST for the fixture, changed by `over`, is refused with."""
    fields = {
        "fp": FIXTURE_FP,
        "blocks": tuple(FIXTURE_CHAIN),
        "transports": ("tcp",),
        "max_price": 10**15,
        **over,
    }
    ask = s.frame(QuoteRequest(**fields))
    s.send(ask)
    answer = s.answer(seq_of(ask))
    if answer is None:
        raise Failed("QUOTE_REQUEST was not answered")
    return answer.message.code if isinstance(answer.message, Error) else answer.type.name


@case("10.2/5", "MUST", "a QUOTE_REQUEST failing several checks gets the first one's code")
def _(s: Session) -> None:
    s.hello()
    _quote(s)  # the fixture is held (else: skipped)
    worst = {"transports": ("x-none",), "max_price": 0}  # fail checks 6 and 7 as well
    for label, over, want in (
        ("another fingerprint", {"fp": bytes(32)}, ErrorCode.FINGERPRINT_MISMATCH),
        ("a chain not held", {"blocks": (bytes(32),)}, ErrorCode.NOT_FOUND),
        ("an unconvertible dtype", {"dtype": "float8_e5m2"}, ErrorCode.UNSUPPORTED_CONVERSION),
        ("no common transport", {}, ErrorCode.NO_COMMON_TRANSPORT),
    ):
        got = _refusal(s, **{**worst, **over})
        if got != want:
            raise Failed(f"{label}, also over price and transport: answered {got}, not {want.name}")


def _payer(s: Session, q: Quote):
    """Receipts for the payment window (§9.4): the first `n` bytes at their share (§8.14)."""
    return lambda n: s.frame(
        Receipt(
            quote=q.quote, seller=s.target_id, root=q.root, bytes=n, price=q.price * n // q.deliver
        )
    )


def _quote_error(s: Session, fp: bytes) -> ErrorCode | str:
    try:
        answer = _quote(s, fp)
    except Failed as exc:
        text = str(exc)
        with contextlib.suppress(ValueError):
            return ErrorCode(int(text.split()[1].rstrip(":")))
        return text
    return answer.type.name


def _long_deal(s: Session, paid_before: bool = False) -> Quote:
    """A QUOTE for the long fixture with a payment window smaller than it, accepted;
    `paid_before`: by a buyer that first bought and paid for the short fixture, so that
    what the suite's earlier cases left unpaid from its network does not count (§10.5)."""
    if paid_before:
        bought = _bought(s)
        _settle(s, bought, bought.deliver)
    q = _quote_for(s, LONG_FIXTURE_FP, LONG_FIXTURE_CHAIN, "long fixture")
    if not q.window or q.window >= q.deliver:
        raise Skipped("the target quotes no payment window smaller than the long fixture")
    s.send(s.frame(Accept(quote=q.quote, price=q.price, root=q.root)))
    return q


def _window_refused(s: Session, q: Quote, receipt) -> None:
    """The first window's receipt is `receipt(bytes)`: the stream ends, with
    UNKNOWN_TRANSFER, after exactly that window."""
    frame = s.frame(Transfer(quote=q.quote, token=q.token, first=0))
    stream = open_stream(q.data, frame, q, lambda n: s.frame(receipt(n)), timeout=5.0)
    codes = [st.message.code for st in stream.controls if isinstance(st.message, Error)]
    if codes != [ErrorCode.UNKNOWN_TRANSFER]:
        raise Failed(f"the seller answered {codes or 'nothing'}, not UNKNOWN_TRANSFER")
    if len(stream.chunks) != q.window // q.chunk:
        raise Failed(f"{len(stream.chunks)} chunks streamed, the window is {q.window // q.chunk}")


@case("9.4/1", "MUST", "a buyer that pays each window receives the whole long fixture")
def _(s: Session) -> None:
    q = _long_deal(s)
    _whole(_stream(s, q), q, LONG_FIXTURE_PAYLOAD)
    _settle(s, q, q.deliver)


@case("9.4/2", "MUST", "a buyer that stops paying receives exactly one window, no more")
def _(s: Session) -> None:
    q = _long_deal(s)
    frame = s.frame(Transfer(quote=q.quote, token=q.token, first=0))
    stream = open_stream(q.data, frame, q, lambda n: None, timeout=3.0)
    if len(stream.chunks) != q.window // q.chunk:
        raise Failed(f"{len(stream.chunks)} chunks unpaid, the window is {q.window // q.chunk}")


@case("9.4/3", "MUST", "a window receipt at a wrong share of the price ends the stream")
def _(s: Session) -> None:
    q = _long_deal(s)
    _window_refused(s, q, lambda n: _receipt(s, q, bytes=n, price=q.price * n // q.deliver + 1))


@case("9.4/4", "MUST", "a window receipt for less than was sent (early or short) ends it")
def _(s: Session) -> None:
    q = _long_deal(s)
    less = q.window - q.chunk
    if less <= 0:
        raise Skipped("the target's payment window is one chunk: nothing is less")
    _window_refused(s, q, lambda n: _receipt(s, q, bytes=less, price=q.price * less // q.deliver))


@case("9.2/1", "MUST", "a TRANSFER with a wrong session token streams nothing (BAD_TOKEN)")
def _(s: Session) -> None:
    _refused_stream(_stream(s, _deal(s), token=bytes(32)), ErrorCode.BAD_TOKEN)


@case("9.2/2", "MUST", "a session token is single-use: a second TRANSFER gets BAD_TOKEN")
def _(s: Session) -> None:
    q = _deal(s)
    if _stream(s, q).fault:
        raise Failed("the first stream failed")
    _refused_stream(_stream(s, q), ErrorCode.BAD_TOKEN)


@case(
    "9.2/8",
    "MUST",
    "a TRANSFER failing §6.4 after its signature is answered with that step's code",
)
def _(s: Session) -> None:
    q = _quoted(s)  # its data address; no deal is needed to fail before the token
    transfer = Transfer(quote=q.quote, token=q.token, first=0)
    past = now_ms() - 120_000
    for label, frame, code in (
        ("a field of the wrong type", signed_body(s, transfer, first="0"), ErrorCode.INVALID_FIELD),
        ("to another node", s.frame(transfer, to=bytes(32)), ErrorCode.WRONG_RECIPIENT),
        ("expired", s.frame(transfer, iat=past, exp=past + 1000), ErrorCode.EXPIRED),
        ("not a TRANSFER", s.frame(_receipt(s, q)), ErrorCode.UNEXPECTED_MESSAGE),
    ):
        stream = open_stream(q.data, frame, q, _payer(s, q))
        try:
            _refused_stream(stream, code)
        except Failed as exc:
            raise Failed(f"{label}: {exc}") from None


@case("9.2/5", "MUST", "the same TRANSFER frame on a second connection is REPLAYED")
def _(s: Session) -> None:
    q = _deal(s)
    frame = s.frame(Transfer(quote=q.quote, token=q.token, first=0))
    if open_stream(q.data, frame, q, _payer(s, q)).fault:
        raise Failed("the first stream failed")
    _refused_stream(open_stream(q.data, frame, q, _payer(s, q)), ErrorCode.REPLAYED)


@case("9.2/6", "MUST", "a TRANSFER that arrives before its ACCEPT waits for it, then streams")
def _(s: Session) -> None:
    s.hello()
    q = _quote(s).message
    if not isinstance(q, Quote):
        raise Failed(f"expected a QUOTE, got {q!r}")
    accept = s.frame(Accept(quote=q.quote, price=q.price, root=q.root))
    later = threading.Timer(1.0, s.send, [accept])  # the TRANSFER goes first
    later.start()
    try:
        stream = _stream(s, q)
    finally:
        later.join()
    _whole(stream, q, FIXTURE_PAYLOAD)


@case("9.2/7", "MUST", "a TRANSFER whose quote is never accepted gets BAD_TOKEN (after 5 s)")
def _(s: Session) -> None:
    s.hello()
    q = _quote(s).message
    if not isinstance(q, Quote):
        raise Failed(f"expected a QUOTE, got {q!r}")
    _refused_stream(_stream(s, q), ErrorCode.BAD_TOKEN)


@case("9.2/3", "MUST", "a TRANSFER whose first chunk is past the delivery is INVALID_FIELD")
def _(s: Session) -> None:
    q = _deal(s)
    _refused_stream(_stream(s, q, first=-(-q.deliver // q.chunk)), ErrorCode.INVALID_FIELD)


@case("9.7/1", "MUST", "a TRANSFER with first and last streams exactly those chunks, then END")
def _(s: Session) -> None:
    q = _long_deal(s, paid_before=True)
    first, last = 3, 9  # across a window boundary, paid from the stream's first chunk
    frame = s.frame(Transfer(quote=q.quote, token=q.token, first=first, last=last))
    stream = open_stream(q.data, frame, q, _payer(s, q), first=first, last=last, timeout=5.0)
    if stream.fault or not stream.ended:
        raise Failed(f"the stream failed: {stream.fault or 'no END'}")
    if sorted(stream.chunks) != list(range(first, last + 1)):
        raise Failed(f"chunks {sorted(stream.chunks)} streamed, not {first} … {last}")
    if any(stream.chunks[i] != _long_chunk(q, i) for i in stream.chunks):
        raise Failed("verified bytes differ from the long fixture")
    _settle(s, q, len(stream.chunks) * q.chunk)


@case("9.7/2", "MUST", "a TRANSFER sent again mid-stream with a smaller last ends it sooner")
def _(s: Session) -> None:
    q = _long_deal(s, paid_before=True)
    window, last = q.window // q.chunk, 1
    shorter = s.frame(Transfer(quote=q.quote, token=q.token, first=0, last=last))
    frame = s.frame(Transfer(quote=q.quote, token=q.token, first=0))
    stream = open_stream(q.data, frame, q, _payer(s, q), timeout=5.0, shorten=(0, shorter, last))
    if stream.fault or not stream.ended:
        raise Failed(f"the stream did not end when asked: {stream.fault or 'no END'}")
    # It ends after chunk 1, or after those sent before it read the request: never past the
    # window, which waits for a receipt this buyer no longer owes.
    if not last + 1 <= len(stream.chunks) <= window:
        raise Failed(f"{len(stream.chunks)} chunks before END; asked for {last + 1}")
    _settle(s, q, len(stream.chunks) * q.chunk)


@case("9.7/3", "MUST", "a TRANSFER whose last chunk is past the delivery is INVALID_FIELD")
def _(s: Session) -> None:
    q = _deal(s)
    count = -(-q.deliver // q.chunk)
    frame = s.frame(Transfer(quote=q.quote, token=q.token, first=0, last=count))
    _refused_stream(open_stream(q.data, frame, q, _payer(s, q)), ErrorCode.INVALID_FIELD)


@case("9.7/4", "MUST", "a TRANSFER mid-stream asking for no fewer chunks is INVALID_FIELD")
def _(s: Session) -> None:
    q = _long_deal(s, paid_before=True)
    count = -(-q.deliver // q.chunk)
    longer = s.frame(Transfer(quote=q.quote, token=q.token, first=0, last=count - 1))
    frame = s.frame(Transfer(quote=q.quote, token=q.token, first=0))
    stream = open_stream(q.data, frame, q, lambda n: None, timeout=5.0, shorten=(0, longer, 0))
    codes = [st.message.code for st in stream.controls if isinstance(st.message, Error)]
    if codes != [ErrorCode.INVALID_FIELD] or stream.ended:
        raise Failed(f"the seller answered {codes or 'nothing'} (END: {stream.ended})")


def _settle(s: Session, q: Quote, carried: int) -> None:
    """The final RECEIPT of a stream that ended, for what it carried (§10.6): the
    seller takes it, and the suite's network owes nothing for the case."""
    s.send(s.frame(_receipt(s, q, bytes=carried, price=q.price * carried // q.deliver)))
    if any(isinstance(st.message, Error) for st in s.receive(1.0)):
        raise Failed("the final RECEIPT for what the stream carried was refused")


def _long_chunk(q: Quote, index: int) -> bytes:
    return LONG_FIXTURE_PAYLOAD[index * q.chunk : (index + 1) * q.chunk]


def _ask(s: Session, message) -> Statement:
    frame = s.frame(message)
    s.send(frame)
    answer = s.answer(seq_of(frame))
    if answer is None:
        raise Failed(f"{message.TYPE.name} was not answered")
    return answer


def _receipt(s: Session, q: Quote, **over) -> Receipt:
    fields = {
        "quote": q.quote,
        "seller": s.target_id,
        "root": q.root,
        "bytes": q.deliver,
        "price": q.price,
    }
    return Receipt(**{**fields, **over})


def _bought(s: Session) -> Quote:
    q = _deal(s)
    _whole(_stream(s, q), q, FIXTURE_PAYLOAD)
    return q


def _quoted(s: Session) -> Quote:
    """A QUOTE for the fixture, neither accepted nor rejected."""
    s.hello()
    q = _quote(s).message
    if not isinstance(q, Quote):
        raise Failed(f"expected a QUOTE, got {q!r}")
    return q


def _accept(q: Quote, **over) -> Accept:
    return Accept(**{"quote": q.quote, "price": q.price, "root": q.root, **over})


@case("8.10/1", "MUST", "a QUOTE without a conversion names the advertised root, chunk, layout")
def _(s: Session) -> None:
    s.hello()
    ask = s.frame(Lookup(fp=FIXTURE_FP, blocks=tuple(FIXTURE_CHAIN), limit=16))
    s.send(ask)
    found = s.answer(seq_of(ask))
    if found is None or not isinstance(found.message, LookupResult):
        raise Failed("LOOKUP was not answered")
    ads = [open_envelope(frame) for frame in found.message.ads]
    own = [ad.message for ad in ads if ad.signer == s.target_key]
    if not own:
        raise Skipped("the target does not advertise the conformance fixture")
    q = _quote(s).message
    assert isinstance(q, Quote)
    ad = own[0]
    assert isinstance(ad, Advertise)
    if (q.root, q.chunk, q.layout, q.stored) != (ad.root, ad.chunk, ad.layout, len(ad.blocks)):
        raise Failed("the QUOTE differs from the target's own advertisement")


@case("10.3/1", "MUST", "a QUOTE_REQUEST with no transport in common is NO_COMMON_TRANSPORT")
def _(s: Session) -> None:
    s.hello()
    _quote(s)  # skips without the fixture
    request = QuoteRequest(
        fp=FIXTURE_FP, blocks=tuple(FIXTURE_CHAIN), transports=("x-none",), max_price=10**15
    )
    refused(s, s.frame(request), ErrorCode.NO_COMMON_TRANSPORT)


@case("10.2a/1", "MUST", "a QUOTE never asks more than max_price (or the bid is refused)")
def _(s: Session) -> None:
    s.hello()
    _quote(s)
    request = QuoteRequest(
        fp=FIXTURE_FP, blocks=tuple(FIXTURE_CHAIN), transports=("tcp",), max_price=1
    )
    answer = _ask(s, request).message
    if isinstance(answer, Quote) and answer.price > 1:
        raise Failed(f"quoted {answer.price} against a bid of 1")
    if isinstance(answer, Error) and answer.code != ErrorCode.PRICE_TOO_HIGH:
        raise Failed(f"refused with {answer.code}, not PRICE_TOO_HIGH")


@case("10.1/2", "MUST", "a counter-offer is answered with a QUOTE at it or PRICE_TOO_HIGH")
def _(s: Session) -> None:
    q = _quoted(s)
    answer = _ask(s, Reject(quote=q.quote, reason=0, counter=1)).message
    if isinstance(answer, Quote):
        if answer.price != 1 or answer.quote == q.quote:
            raise Failed("a counter-offer must be a new quote at the countered price")
    elif not (isinstance(answer, Error) and answer.code == ErrorCode.PRICE_TOO_HIGH):
        raise Failed(f"answered {answer!r}")


@case("10.1/3", "MUST", "a fourth counter-offer is never answered with a QUOTE")
def _(s: Session) -> None:
    s.hello()
    q = _quote(s).message
    for n in range(4):
        answer = _ask(s, Reject(quote=q.quote, reason=0, counter=q.price)).message
        if not isinstance(answer, Quote):
            if n < 3:
                raise Skipped(f"the target takes no counter-offer at its own price ({answer!r})")
            return
        q = answer
    raise Failed("the fourth counter-offer was answered with a QUOTE")


@case("10.1/4", "MUST", "a counter above the quoted price is INVALID_FIELD, and ends the quote")
def _(s: Session) -> None:
    q = _quoted(s)
    refused(
        s, s.frame(Reject(quote=q.quote, reason=0, counter=q.price + 1)), ErrorCode.INVALID_FIELD
    )
    accept = Accept(quote=q.quote, price=q.price, root=q.root)
    refused(s, s.frame(accept), ErrorCode.UNEXPECTED_MESSAGE)  # REJECTED (§10.4)


@case("10.4/1", "MUST", "ACCEPT and REJECT of a quote never issued are UNKNOWN_QUOTE")
def _(s: Session) -> None:
    s.hello()
    refused(s, s.frame(Accept(quote=bytes(16), price=1, root=bytes(32))), ErrorCode.UNKNOWN_QUOTE)
    refused(s, s.frame(Reject(quote=bytes(16), reason=0)), ErrorCode.UNKNOWN_QUOTE)


@case("10.4/2", "MUST", "an ACCEPT whose price differs from the quote's is UNKNOWN_QUOTE")
def _(s: Session) -> None:
    q = _quoted(s)
    refused(s, s.frame(_accept(q, price=q.price + 1)), ErrorCode.UNKNOWN_QUOTE)


@case("10.4/3", "MUST", "ACCEPT, then ACCEPT or REJECT of the same quote: UNEXPECTED_MESSAGE")
def _(s: Session) -> None:
    q = _deal(s)
    refused(s, s.frame(_accept(q)), ErrorCode.UNEXPECTED_MESSAGE)
    refused(s, s.frame(Reject(quote=q.quote, reason=0)), ErrorCode.UNEXPECTED_MESSAGE)


@case("10.4/4", "MUST", "REJECT, then ACCEPT or REJECT of the same quote: UNEXPECTED_MESSAGE")
def _(s: Session) -> None:
    q = _quoted(s)
    s.send(s.frame(Reject(quote=q.quote, reason=0)))
    refused(s, s.frame(_accept(q)), ErrorCode.UNEXPECTED_MESSAGE)
    refused(s, s.frame(Reject(quote=q.quote, reason=0)), ErrorCode.UNEXPECTED_MESSAGE)


@case("10.4/5", "MUST", "a RECEIPT for a quote without a deal is UNKNOWN_TRANSFER")
def _(s: Session) -> None:
    q = _quoted(s)
    refused(s, s.frame(_receipt(s, q)), ErrorCode.UNKNOWN_TRANSFER)


@case("10.6/1", "MUST", "a RECEIPT whose price is not the deal's is UNKNOWN_TRANSFER")
def _(s: Session) -> None:
    q = _bought(s)
    refused(s, s.frame(_receipt(s, q, price=q.price + 1)), ErrorCode.UNKNOWN_TRANSFER)


@case("10.6/4", "MUST", "a RECEIPT for part of a delivery, on the control channel, is refused")
def _(s: Session) -> None:
    q = _deal(s)  # accepted, never streamed
    part = q.deliver // 2  # a share the deal allows: only the channel is wrong
    receipt = _receipt(s, q, bytes=part, price=q.price * part // q.deliver)
    refused(s, s.frame(receipt), ErrorCode.UNKNOWN_TRANSFER)


@case("10.6/2", "MUST", "the same RECEIPT frame twice is REPLAYED")
def _(s: Session) -> None:
    q = _bought(s)
    frame = s.frame(_receipt(s, q))
    s.send(frame)
    if any(isinstance(st.message, Error) for st in s.receive(1.0)):
        raise Failed("the RECEIPT was refused")
    refused(s, frame, ErrorCode.REPLAYED)


@case("10.6/3", "MUST", "a second RECEIPT with equal fields under a new seq is REPLAYED")
def _(s: Session) -> None:
    q = _bought(s)
    s.send(s.frame(_receipt(s, q)))
    if any(isinstance(st.message, Error) for st in s.receive(1.0)):
        raise Failed("the RECEIPT was refused")
    refused(s, s.frame(_receipt(s, q)), ErrorCode.REPLAYED)
