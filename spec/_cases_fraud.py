"""Cases for spec §8.19-8.21: accusations and their evidence, as a target that holds no
weights for the suite's fingerprint must treat them."""

from __future__ import annotations

import secrets
import time

from kvx.protocol import (
    Accuse,
    ErrorCode,
    EvidencePart,
    EvidenceRequest,
    Lookup,
    LookupResult,
)
from kvx.trust import Identity

from ._case import FIXTURE_FP, case, refused, seq_of, signed_body, silent
from ._cases_gossip import _advert, _own_chain
from ._peer import Failed, Session, now_ms


def _accuse(s: Session, seller: bytes) -> Accuse:
    return Accuse(
        seller=seller,
        fp=FIXTURE_FP,
        root=bytes(32),
        evidence=secrets.token_bytes(32),
        size=1 << 20,
        kind="layer0",
    )


@case(
    "8.19/1",
    "MUST",
    "a node without the weights does not act on an ACCUSE: the accused's ad stays listed",
)
def _(s: Session) -> None:
    s.hello()
    chain = _own_chain(s)
    s.send(_advert(s, chain))  # the session's identity sells; another accuses it
    time.sleep(0.3)
    accuser = Identity.generate()
    accusation = _accuse(s, s.identity.node_id)
    s.send(s.frame(accusation, signer=accuser, to=None, exp=now_ms() + 600_000))
    time.sleep(0.5)
    ask = s.frame(Lookup(fp=FIXTURE_FP, blocks=tuple(chain), limit=4))
    s.send(ask)
    answer = s.answer(seq_of(ask))
    if answer is None or not isinstance(answer.message, LookupResult):
        raise Failed("after an ACCUSE it cannot judge, the target stopped serving the accused")
    if answer.message.matched != len(chain):
        raise Failed("the accused's advertisement was dropped on an unchecked accusation")


@case("8.19/2", "MUST", "a malformed ACCUSE (size 0) is refused unanswered; the target serves on")
def _(s: Session) -> None:
    s.hello()
    silent(s, signed_body(s, _accuse(s, Identity.generate().node_id), size=0))


@case("8.20/1", "MUST", "an EVIDENCE_REQUEST for evidence the target does not hold is NOT_FOUND")
def _(s: Session) -> None:
    s.hello()
    request = EvidenceRequest(evidence=secrets.token_bytes(32), offset=0)
    refused(s, s.frame(request), ErrorCode.NOT_FOUND)


@case("8.21/1", "MUST", "an EVIDENCE nobody asked for is UNEXPECTED_MESSAGE")
def _(s: Session) -> None:
    s.hello()
    part = EvidencePart(re=1, evidence=secrets.token_bytes(32), offset=0, total=4, part=b"kvx!")
    refused(s, s.frame(part), ErrorCode.UNEXPECTED_MESSAGE)
