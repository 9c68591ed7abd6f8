"""SWIM's indirect probes (ping-req, spec §8.17 and §8.18), sans-I/O: what a node asked of
its helpers, and what it was asked to do for others.

A probe that goes unanswered for half the suspicion time may be one lossy link, not a
dead peer: the node asks a few other peers to probe it too (PROBE), and a helper that
hears from the target sends the target's own signed statement back (PROBE_ACK). The
asker checks that proof itself — signed by the target, addressed to the helper, issued
no earlier than the clock skew before the asking, not used before — so a helper can
vouch for a peer only with the peer's own recent words, never with its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvx.protocol import (
    MAX_CLOCK_SKEW_MS,
    MAX_PROOF_BYTES,
    RELAYABLE,
    ErrorCode,
    ProbeAck,
    RemoteProtocolError,
)
from kvx.trust import Statement, open_envelope

HELP_PER_TARGET = 8
"""Askers one target's PROBEs are held for at once; more are OVER_BUDGET."""
HELP_MAX = 256
"""Askers held for, over all targets."""
USED_PROOFS = 8
"""Proofs remembered per target, so that a helper cannot show one twice."""
HELP_EVERY_S = 1.0
"""A helper probes one target at most this often, however many ask: askers within it
wait for that probe's answer, or take the answer it already brought (spec §8.17)."""


@dataclass(frozen=True)
class Asked:
    """A PROBE this node sent a helper, waiting for its PROBE_ACK."""

    target: bytes
    sent_ms: int
    until: float


@dataclass(frozen=True)
class Waiting:
    """A PROBE this node took as a helper: whom to answer, and on which connection."""

    asker: bytes
    routing: bytes | None
    seq: int
    until: float


class IndirectProbes:
    def __init__(self) -> None:
        self._asked: dict[tuple[bytes, int], Asked] = {}  # (helper, PROBE seq) -> ...
        self._waiting: dict[bytes, list[Waiting]] = {}  # target -> askers
        self._used: dict[bytes, deque[int]] = {}  # target -> seqs of proofs taken
        self._probed: dict[bytes, float] = {}  # target -> when we last probed it for askers
        self._fresh: dict[bytes, tuple[float, Statement]] = {}  # target -> its last answer

    def held(self) -> dict[str, int]:
        return {
            "probes_asked": len(self._asked),
            "probes_helping": sum(len(w) for w in self._waiting.values()),
        }

    # ---- the asker -------------------------------------------------------------------

    def asked(self, helper: bytes, seq: int, target: bytes, sent_ms: int, until: float) -> None:
        self._asked[(helper, seq)] = Asked(target, sent_ms, until)

    def take_ack(self, st: Statement) -> bytes | None:
        """The target a PROBE_ACK proves alive, None for one nobody asked for
        (ignored), or the RemoteProtocolError of a proof that does not hold."""
        ack, helper = st.message, st.signer
        assert isinstance(ack, ProbeAck)
        asked = self._asked.get((helper, ack.re))
        if asked is None or asked.target != ack.target:
            return None
        proof = open_envelope(ack.proof)
        if proof.signer != ack.target or proof.type in RELAYABLE or proof.header.to != st.signer_id:
            raise RemoteProtocolError(
                ErrorCode.INVALID_FIELD, "proof is not the target's own statement to the helper"
            )
        used = self._used.setdefault(ack.target, deque(maxlen=USED_PROOFS))
        if proof.header.iat < asked.sent_ms - MAX_CLOCK_SKEW_MS or proof.header.seq in used:
            raise RemoteProtocolError(ErrorCode.INVALID_FIELD, "proof is stale or used")
        used.append(proof.header.seq)
        del self._asked[(helper, ack.re)]
        return ack.target

    # ---- the helper ------------------------------------------------------------------

    def fresh(self, target: bytes, now: float) -> Statement | None:
        """The target's answer to our probe of it within HELP_EVERY_S: proof enough for
        an asker now, without probing it again."""
        heard = self._fresh.get(target)
        return heard[1] if heard is not None and now - heard[0] < HELP_EVERY_S else None

    def help(self, waiting: Waiting, target: bytes, now: float) -> bool:
        """Hold an asker until the target speaks; True when the target needs a probe,
        at most once each HELP_EVERY_S, so that askers cost the target one HELLO a second
        however many they are and however fast they ask."""
        held = self._waiting.setdefault(target, [])
        if len(held) >= HELP_PER_TARGET or sum(map(len, self._waiting.values())) >= HELP_MAX:
            raise RemoteProtocolError(ErrorCode.OVER_BUDGET, "too many probes waiting")
        held.append(waiting)
        if now - self._probed.get(target, float("-inf")) < HELP_EVERY_S:
            return False
        self._probed[target] = now
        return True

    def vouch(self, st: Statement, now: float) -> list[Waiting]:
        """The askers a direct statement from their target answers (if it fits in a
        PROBE_ACK; a larger one leaves them waiting for the next)."""
        if st.signer not in self._waiting or len(st.frame) > MAX_PROOF_BYTES:
            return []
        self._fresh[st.signer] = (now, st)
        return self._waiting.pop(st.signer)

    # ---- both ------------------------------------------------------------------------

    def expire(self, now: float, known: set[bytes]) -> None:
        """Drop what is past its time, and proofs of peers no longer in the table."""
        self._asked = {k: a for k, a in self._asked.items() if a.until > now}
        for target in list(self._waiting):
            live = [w for w in self._waiting[target] if w.until > now]
            if live:
                self._waiting[target] = live
            else:
                del self._waiting[target]
        for target in [t for t in self._used if t not in known]:
            del self._used[target]
        self._probed = {t: at for t, at in self._probed.items() if now - at < HELP_EVERY_S}
        self._fresh = {t: h for t, h in self._fresh.items() if now - h[0] < HELP_EVERY_S}
