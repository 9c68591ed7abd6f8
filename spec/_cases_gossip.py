"""Cases for spec §6.3, §7.6, §7.7 and §8: membership, gossip, lookups and namespaces."""

from __future__ import annotations

import contextlib
import secrets
import socket
import time

import blake3

from kvx.protocol import (
    MAX_UNKNOWN_BYTES,
    Advertise,
    DataAddress,
    Digest,
    DigestEntry,
    Error,
    ErrorCode,
    Hello,
    KVLayout,
    Leave,
    Lookup,
    LookupResult,
    Membership,
    NamespaceProof,
    PeerEntry,
    Peers,
    Probe,
    ProbeAck,
    Quote,
    QuoteRequest,
    Transfer,
)
from kvx.trust import Identity, open_envelope, seal

from ._case import FIXTURE_FP, FIXTURE_LAYOUT, case, refused, seq_of, signed_body
from ._peer import Failed, Listener, Session, Skipped, now_ms


@case("8.2/1", "MUST", "a HELLO is answered with PEERS, re = its seq, signed by the target")
def _(s: Session) -> None:
    answer = s.hello()
    if answer.signer != s.target_key:
        raise Failed("PEERS is signed by a key other than the target's")


@case("7.6/1", "SHOULD", "PEERS answering a HELLO carries the session's membership challenge")
def _(s: Session) -> None:
    if s.hello().message.challenge is None:  # type: ignore[union-attr]
        raise Failed("no challenge in PEERS")


def _ad(chain: list[bytes]) -> Advertise:
    return Advertise(
        fp=FIXTURE_FP,
        layout=FIXTURE_LAYOUT,
        blocks=tuple(chain),
        root=blake3.blake3(b"".join(chain)).digest(),  # one root per chain: none replaces another
        chunk=1 << 16,
        price=1,
        ctl="tcp://127.0.0.1:9",
        data=(DataAddress("tcp", "127.0.0.1:9"),),
    )


def _advert(s: Session, chain: list[bytes]) -> bytes:
    return s.frame(_ad(chain), exp=now_ms() + 600_000)


def _own_chain(s: Session) -> list[bytes]:
    return [blake3.blake3(s.identity.public_key + bytes([i])).digest() for i in range(3)]


@case("8.3/1", "SHOULD", "PEERS answering a HELLO names in recent an ADVERTISE just taken")
def _(s: Session) -> None:
    s.hello()
    frame = _advert(s, _own_chain(s))
    s.send(frame)
    time.sleep(0.3)
    other = Session(s.ctx, s.target, s.target_key)  # another prober hears the news
    try:
        recent = other.hello().message.recent or ()  # type: ignore[union-attr]
    finally:
        other.close()
    ad = open_envelope(frame)
    if not any(e.key == ad.signer and e.seq == ad.header.seq for e in recent):
        raise Failed(f"recent lists {len(recent)} statements, not the ADVERTISE just taken")


@case("8.3/2", "SHOULD", "a PEERS whose recent names news the target lacks brings a DIGEST")
def _(s: Session) -> None:
    s.hello()
    listener = Listener(s)
    try:
        listener.join()
        news = DigestEntry(key=Identity.generate().public_key, seq=7)
        listener.session.send(listener.session.frame(Peers(peers=(), recent=(news,))))
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            if any(isinstance(st.message, Digest) for st in list(listener.heard)):
                return
            time.sleep(0.1)
    finally:
        listener.close()
    raise Failed("no DIGEST came to pull the news the target lacks")


SIGNER_BUDGET = 512
"""Advertisements per signer a target run for the suite holds (spec/README.md)."""


@case("13.1/1", "SHOULD", f"an ADVERTISE past the signer's budget ({SIGNER_BUDGET}) is dropped")
def _(s: Session) -> None:
    s.hello()
    chains = [
        [blake3.blake3(s.identity.public_key + i.to_bytes(2, "big")).digest()]
        for i in range(SIGNER_BUDGET + 1)
    ]
    for chain in chains:  # 150 a second: within every rate the spec names (§13.1)
        s.send(_advert(s, chain))
        time.sleep(1 / 150)
    s.receive(1.0)
    if not _lookup(s, chains[SIGNER_BUDGET - 1]).ads:
        raise Failed(f"the signer's advertisement number {SIGNER_BUDGET} was not indexed")
    if _lookup(s, chains[SIGNER_BUDGET]).ads:
        raise Skipped(
            f"the target held {SIGNER_BUDGET + 1} advertisements of one signer: run it with"
            f" max_ads_per_signer = {SIGNER_BUDGET} (spec/README.md)"
        )
    s.hello()  # and it serves on


@case("8.6/1", "MUST", "an ADVERTISE gossiped to the target comes back in answer to a DIGEST")
def _(s: Session) -> None:
    s.hello()
    frame = _advert(s, _own_chain(s))
    s.send(frame)
    time.sleep(0.3)
    # The target may hold many statements and answers a page at a time (§8.6): pull the
    # pages, each DIGEST listing what came, until ours does.
    have: dict[tuple[bytes, int], None] = {}
    for _ in range(30):
        entries = tuple(DigestEntry(key=k, seq=q) for k, q in list(have)[:4096])
        s.send(s.frame(Digest(have=entries)))
        answers = s.receive(1.5)
        if any(st.frame == frame for st in answers):
            return
        fresh = [st for st in answers if st.type.name in ("ADVERTISE", "WITHDRAW")]
        if not fresh:
            break
        have.update(((st.signer, st.header.seq), None) for st in fresh)
    raise Failed("the advertisement did not come back, byte for byte, after DIGEST")


@case("8.6/2", "MUST", "a DIGEST is answered with one page: at most 200 statements")
def _(s: Session) -> None:
    s.hello()
    for i in range(300):  # 150 a second: within every limit the spec names (§13.1)
        chain = [blake3.blake3(s.identity.public_key + i.to_bytes(2, "big")).digest()]
        s.send(_advert(s, chain))
        time.sleep(1 / 150)
    s.receive(1.0)
    s.send(s.frame(Digest(have=())))
    sent = [st for st in s.receive(2.0) if st.type.name in ("ADVERTISE", "WITHDRAW")]
    if not sent:
        raise Failed("the DIGEST was not answered")
    if len(sent) > 200:
        raise Failed(f"one DIGEST brought back {len(sent)} statements at once")


@case("8.7/1", "MUST", "LOOKUP returns the longest prefix held, with the signed ADVERTISE")
def _(s: Session) -> None:
    s.hello()
    chain = _own_chain(s)
    frame = _advert(s, chain)
    s.send(frame)
    time.sleep(0.3)
    ask = s.frame(Lookup(fp=FIXTURE_FP, blocks=(chain[0], chain[1], bytes(32)), limit=4))
    s.send(ask)
    answer = s.answer(seq_of(ask))
    if answer is None or not isinstance(answer.message, LookupResult):
        raise Failed("LOOKUP was not answered with LOOKUP_RESULT")
    if answer.message.matched != 2 or frame not in answer.message.ads:
        raise Failed(
            f"matched {answer.message.matched} (want 2), our ad listed: "
            f"{frame in answer.message.ads}"
        )


@case("8.7/2", "MUST", "LOOKUP of a chain nobody holds is a miss: matched 0, no ads")
def _(s: Session) -> None:
    ask = s.frame(Lookup(fp=FIXTURE_FP, blocks=(blake3.blake3(b"nobody").digest(),), limit=4))
    s.send(ask)
    answer = s.answer(seq_of(ask))
    if answer is None or not isinstance(answer.message, LookupResult):
        raise Failed("LOOKUP was not answered with LOOKUP_RESULT")
    if answer.message.matched != 0 or answer.message.ads:
        raise Failed("a miss must list nothing")


def _lookup(s: Session, chain: list[bytes], ns: bytes | None = None) -> LookupResult:
    ask = s.frame(Lookup(fp=FIXTURE_FP, blocks=tuple(chain), limit=4, ns=ns))
    s.send(ask)
    answer = s.answer(seq_of(ask))
    if answer is None or not isinstance(answer.message, LookupResult):
        raise Failed("LOOKUP was not answered with LOOKUP_RESULT")
    return answer.message


def _not_indexed(s: Session, frame: bytes, chain: list[bytes]) -> None:
    """MUST: a refused relayable statement is not indexed, nor answered (§6.5)."""
    s.hello()
    s.send(frame)
    errors = [st for st in s.receive(1.0) if isinstance(st.message, Error)]
    if errors:
        raise Failed(f"a relayable statement was answered ERROR {errors[0].message.code}")
    if _lookup(s, chain).matched:
        raise Failed("the refused advertisement was indexed")
    s.hello()


@case("6.3/1", "MUST", "the same ADVERTISE delivered twice is dropped silently, not an error")
def _(s: Session) -> None:
    s.hello()
    frame = _advert(s, _own_chain(s))
    s.send(frame)
    s.send(frame)
    errors = [st for st in s.receive(1.5) if isinstance(st.message, Error)]
    if errors:
        raise Failed(f"a duplicate relayable statement was answered ERROR {errors[0].message.code}")
    s.hello()


@case(
    "4.5/3",
    "MUST",
    f"an ADVERTISE with over {MAX_UNKNOWN_BYTES} bytes of unknown fields is refused",
)
def _(s: Session) -> None:
    chain = _own_chain(s)
    ad = _ad(chain)
    frame = signed_body(s, ad, zz_ballast=bytes(MAX_UNKNOWN_BYTES + 1))
    _not_indexed(s, frame, chain)


@case("8.1a/4", "MUST", "an ADVERTISE whose data address is a host name is refused")
def _(s: Session) -> None:
    chain = _own_chain(s)
    frame = signed_body(s, _ad(chain), data=[{"t": "tcp", "addr": "example.org:1"}])
    _not_indexed(s, frame, chain)


@case("7.7/1", "MUST", "a LOOKUP naming a private namespace, from a non-member, is a miss")
def _(s: Session) -> None:
    s.hello()
    answer = _lookup(s, [secrets.token_bytes(32)], ns=secrets.token_bytes(32))
    if answer.matched or answer.ads:
        raise Failed("a non-member learned something of a private namespace")


@case(
    "7.7/2", "MUST", "a QUOTE_REQUEST naming a private namespace, from a non-member, is NOT_FOUND"
)
def _(s: Session) -> None:
    s.hello()
    request = QuoteRequest(
        fp=FIXTURE_FP,
        blocks=(secrets.token_bytes(32),),
        transports=("tcp",),
        max_price=10**9,
        ns=secrets.token_bytes(32),
    )
    refused(s, s.frame(request), ErrorCode.NOT_FOUND)


@case("7.6/2", "MUST", "a MEMBERSHIP answering a challenge never issued is NOT_A_MEMBER")
def _(s: Session) -> None:
    s.hello()
    proof = NamespaceProof(ns=secrets.token_bytes(32), mac=secrets.token_bytes(32))
    message = Membership(challenge=secrets.token_bytes(16), proofs=(proof,))
    refused(s, s.frame(message), ErrorCode.NOT_A_MEMBER)


@case("8.1a/5", "MUST", "16 keys named at one address cost that address one connection at most")
def _(s: Session) -> None:
    s.hello()
    with socket.create_server(("127.0.0.1", 0)) as victim:
        victim.settimeout(0.2)
        ctl = f"tcp://127.0.0.1:{victim.getsockname()[1]}"
        keys = [Identity.generate().public_key for _ in range(16)]
        entries = tuple(PeerEntry(key=k, ctl=ctl, inc=1, state=0) for k in keys)
        s.send(s.frame(Peers(peers=entries)))
        opened, deadline = [], time.monotonic() + 3.0
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    opened.append(victim.accept()[0])  # held open: no reconnects
        finally:
            for conn in opened:
                conn.close()
    if len(opened) > 1:
        raise Failed(f"{len(opened)} connections to one address named by 16 keys")
    s.hello()


@case("8.1a/6", "MUST", "a peer named in PEERS that never spoke is not listed onward")
def _(s: Session) -> None:
    s.hello()
    named = Identity.generate().public_key
    ctl = "tcp://127.0.0.1:7"  # nobody there: the name never speaks for itself
    s.send(s.frame(Peers(peers=(PeerEntry(key=named, ctl=ctl, inc=1, state=0),))))
    time.sleep(0.5)
    listed = s.hello().message.peers  # type: ignore[union-attr]
    if any(e.key == named for e in listed):
        raise Failed("the target lists a name it was given and never heard at its address")


@case("8.17/1", "MUST", "a PROBE for a key that is no live peer of the target is NOT_FOUND")
def _(s: Session) -> None:
    s.hello()
    refused(s, s.frame(Probe(target=Identity.generate().public_key)), ErrorCode.NOT_FOUND)
    refused(s, s.frame(Probe(target=s.identity.public_key)), ErrorCode.NOT_FOUND)


@case("8.17/3", "MUST", "a PROBE whose target is the helper itself is NOT_FOUND")
def _(s: Session) -> None:
    s.hello()
    refused(s, s.frame(Probe(target=s.target_key)), ErrorCode.NOT_FOUND)


@case("8.17/2", "MUST", "a PROBE for a live peer brings PROBE_ACK with the peer's own statement")
def _(s: Session) -> None:
    s.hello()
    listener = Listener(s)
    try:
        listener.join()
        frame = s.frame(Probe(target=listener.identity.public_key))
        s.send(frame)
        ack = s.answer(seq_of(frame))
    finally:
        listener.close()
    if ack is None or not isinstance(ack.message, ProbeAck):
        raise Failed(f"the PROBE was answered {ack.type.name if ack else 'with silence'}")
    proof = open_envelope(ack.message.proof)
    if ack.message.target != listener.identity.public_key or proof.signer != ack.message.target:
        raise Failed("the PROBE_ACK's proof is not signed by the probed peer")
    if proof.header.to != s.target_id:
        raise Failed("the proof is not the peer's statement to the target")


@case("8.17/4", "SHOULD", "a PROBE of a peer that has gone silent is answered with nothing")
def _(s: Session) -> None:
    s.hello()
    listener = Listener(s)
    try:
        listener.join()
    finally:
        listener.close()  # it answers no more
    time.sleep(1.5)  # past the second in which its last words would count as an answer
    frame = s.frame(Probe(target=listener.identity.public_key))
    s.send(frame)
    if answers := s.receive(4.0):
        raise Failed(f"a PROBE of a silent peer was answered {answers[0].type.name}")


@case("8.18/1", "MUST", "a PROBE_ACK nobody asked for is ignored: not taken, not answered")
def _(s: Session) -> None:
    s.hello()
    other = Identity.generate()
    proof = seal(other, Peers(peers=()), s.header(to=s.target_id))
    s.send(s.frame(ProbeAck(re=1, target=other.public_key, proof=proof)))
    if answers := s.receive(1.5):
        raise Failed(f"the target answered {answers[0].type.name}")
    s.hello()


def _leaving(s: Session, inc: int, leave_inc: int) -> tuple[list[bytes], bytes]:
    """Join at incarnation `inc`, advertise, then LEAVE as `leave_inc`; the chain and ad."""
    s.send(s.frame(Hello(ctl="tcp://127.0.0.1:9", data=(), inc=inc)))
    s.receive(1.0)
    chain = _own_chain(s)
    frame = _advert(s, chain)
    s.send(frame)
    time.sleep(0.3)
    if frame not in _lookup(s, chain).ads:
        raise Failed("the advertisement was not indexed before the LEAVE")
    s.send(s.frame(Leave(inc=leave_inc)))
    time.sleep(0.3)
    return chain, frame


@case("8.22/1", "MUST", "a LEAVE drops the leaver's ads at once; a late copy is not taken again")
def _(s: Session) -> None:
    chain, frame = _leaving(s, inc=1, leave_inc=1)
    if answers := s.receive(0.5):
        raise Failed(f"the target answered LEAVE with {answers[0].type.name}")
    other = Session(s.ctx, s.target, s.target_key)  # a bystander asks: the leaver is silent
    try:
        if _lookup(other, chain).ads:
            raise Failed("the leaver's advertisement is still offered after its LEAVE")
        s.send(frame)  # relayed late by someone that missed the LEAVE
        time.sleep(0.3)
        if _lookup(other, chain).ads:
            raise Failed("an advertisement signed before the LEAVE was taken again")
    finally:
        other.close()


@case("8.22/2", "MUST", "a LEAVE of an incarnation older than the one known is ignored")
def _(s: Session) -> None:
    chain, frame = _leaving(s, inc=5, leave_inc=4)
    other = Session(s.ctx, s.target, s.target_key)
    try:
        if frame not in _lookup(other, chain).ads:
            raise Failed("a LEAVE of incarnation 4 dropped the ads of incarnation 5")
    finally:
        other.close()


@case(
    "8.1/1",
    "MUST",
    "a TRANSFER on the control channel, an unsolicited QUOTE or LOOKUP_RESULT: UNEXPECTED_MESSAGE",
)
def _(s: Session) -> None:
    s.hello()
    quote_id, token = bytes(16), bytes(32)
    transfer = Transfer(quote=quote_id, token=token, first=0)
    refused(s, s.frame(transfer), ErrorCode.UNEXPECTED_MESSAGE)
    quote = Quote(
        re=1,
        quote=quote_id,
        blocks=1,
        stored=1,
        layout=KVLayout(dtype="float16", layers=1, kv_heads=1, head_dim=8, block=16),
        root=bytes(32),
        chunk=1 << 16,
        price=1,
        transport="tcp",
        data="127.0.0.1:9",
        token=token,
    )
    refused(s, s.frame(quote), ErrorCode.UNEXPECTED_MESSAGE)
    refused(s, s.frame(LookupResult(re=1, matched=0, ads=())), ErrorCode.UNEXPECTED_MESSAGE)
