"""Fraud proofs, sans-I/O (spec §8.19-8.21): one buyer's catch protects the network.

A local client whose model refuted a seller's layer 0 hands its node the evidence; the
node convicts the seller, signs an ACCUSE naming the evidence by its hash and tells its
peers. A node that can judge the fingerprint (it holds the weights: the driver's
`judges`) pulls the evidence from the peer that told it, part by part, has the driver
judge it off the loop, and then either convicts the seller and tells its own peers (it
relays only what it checked), or convicts the accuser of a false accusation. A node
that cannot judge keeps the accusation, unchecked, and acts on nothing: otherwise any
free identity could de-list any seller. This part owns the pulls, the accusations it
could not check and what it served; it tells peers through p2p/_gossip.py.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvx.protocol import (
    MAX_EVIDENCE_PART,
    Accuse,
    ErrorCode,
    EvidencePart,
    EvidenceRequest,
    MessageType,
    RemoteProtocolError,
    node_id,
)
from kvx.trust import (
    Event,
    Evidence,
    PeerScores,
    ReplayGuard,
    Statement,
    bind,
    evidence_id,
    open_envelope,
)

from ._events import Accused, Convicted, EvidenceAbandoned, FalseAccusation
from ._gossip import Gossip
from ._liveness import Liveness
from ._outbox import Outbox

MAX_PULLS = 2
"""Evidence pulls under way at once (each up to MAX_EVIDENCE_BYTES held in memory)."""
MAX_WAITING = 32
"""Accusations waiting for a pull; more are dropped (a convicting peer sends again)."""
PULL_S = 120.0
"""How long one pull may take before it is abandoned (nobody is scored for slowness)."""
MAX_UNCHECKED = 1024
"""Accusations kept, unchecked, about sellers this node cannot judge."""
SERVE_BYTES_PER_MIN = 256 << 20
"""Evidence bytes served to one peer a minute; past that, OVER_BUDGET."""


@dataclass(frozen=True)
class Judge:
    """Judge evidence against what its ACCUSE said (seller, fingerprint, root) with the
    weights of `fp`, off the loop, then call NodeCore.judged."""

    evidence: bytes  # its id
    seller: bytes  # node id the ACCUSE names
    fp: bytes
    root: bytes
    data: bytes


@dataclass
class _Pull:
    accuse: Statement
    source: bytes  # the peer that told us, from which the evidence is pulled
    routing: bytes | None  # over the connection it told us on (None: our own to it)
    started: float
    data: bytearray = field(default_factory=bytearray)
    asked: int = 0  # seq of the EVIDENCE_REQUEST in flight


class Fraud:
    def __init__(
        self,
        out: Outbox,
        liveness: Liveness,
        gossip: Gossip,
        *,
        scores: PeerScores,
        guard: ReplayGuard,
        judges: frozenset[bytes],
    ) -> None:
        self.out = out
        self.liveness = liveness
        self.gossip = gossip
        self.scores = scores
        self.guard = guard
        self.judges = judges  # fingerprints the driver can judge
        self.pulls: dict[bytes, _Pull] = {}
        self._waiting: deque[tuple[Statement, bytes, bytes | None]] = deque(maxlen=MAX_WAITING)
        self.unchecked: dict[bytes, tuple[bytes, bytes]] = {}  # seller -> (accuser, proof)
        self._served: dict[bytes, tuple[float, int]] = {}  # peer -> (minute start, bytes)

    def verdict(self, peer: bytes) -> str:
        """What this node holds against a peer, with the proof's id (spec §8.19)."""
        conviction = self.scores.conviction(peer)
        if conviction is not None:
            kind, proof = conviction
            return f"{'convicted' if kind == 'lied' else 'false accuser'} {proof.hex()}"
        accused = self.unchecked.get(peer)
        return f"accused, unchecked {accused[1].hex()}" if accused else ""

    # ---- a local client's evidence ---------------------------------------------------

    def accuse(self, data: bytes) -> bytes:
        """Evidence from this node's own client, whose model refuted the seller: convict,
        sign an ACCUSE and tell every live peer. Returns the proof id."""
        bound = bind(Evidence.decode(data))  # nothing unbound is signed in our name
        proof = evidence_id(data)
        message = Accuse(
            seller=bound.seller,
            fp=bound.fp,
            root=bound.root,
            evidence=proof,
            size=len(data),
            kind="layer0",
        )
        frame = self.out.seal(message)
        self._convict(bound.seller, bound.signer, proof, frame, data)
        for peer in self.liveness.peers.alive():
            self.out.send_frame(peer.key, frame, MessageType.ACCUSE)
        return proof

    # ---- what peers send -------------------------------------------------------------

    def on_accuse(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        a = st.message
        assert isinstance(a, Accuse)
        self.guard.remember(st.signer, st.header)
        if self.scores.conviction(a.seller) is not None or a.evidence in self.pulls:
            return  # known already, or being checked
        if a.fp not in self.judges:
            if len(self.unchecked) < MAX_UNCHECKED:
                self.unchecked.setdefault(a.seller, (st.signer_id, a.evidence))
            self.out.event(
                Accused(seller=a.seller.hex()[:12], accuser=st.signer_id.hex()[:12], checked=0)
            )
            return
        if not relayer:
            return  # nobody to pull the evidence from
        if len(self.pulls) >= MAX_PULLS:
            self._waiting.append((st, relayer, routing))
            return
        self._pull(st, relayer, routing)

    def _pull(self, st: Statement, source: bytes, routing: bytes | None) -> None:
        a = st.message
        assert isinstance(a, Accuse)
        pull = _Pull(st, source, routing, self.out.now.monotonic())
        self.pulls[a.evidence] = pull
        self._ask_evidence(pull)

    def _ask_evidence(self, pull: _Pull) -> None:
        a = pull.accuse.message
        assert isinstance(a, Accuse)
        request = EvidenceRequest(evidence=a.evidence, offset=len(pull.data))
        frame = self.out.seal(request, to=pull.source)
        pull.asked = open_envelope(frame).header.seq
        self.out.answer_frame(pull.routing, pull.source, frame, MessageType.EVIDENCE_REQUEST)

    def on_evidence_request(self, st: Statement, routing: bytes | None) -> None:
        req = st.message
        assert isinstance(req, EvidenceRequest)
        held = self.scores.evidence(req.evidence, req.offset, MAX_EVIDENCE_PART)
        if held is None:
            raise RemoteProtocolError(ErrorCode.NOT_FOUND, "no evidence of that id here")
        part, total = held
        if req.offset >= total:
            raise RemoteProtocolError(ErrorCode.INVALID_FIELD, "offset past the evidence")
        now = self.out.now.monotonic()
        start, sent = self._served.get(st.signer_id, (now, 0))
        if now - start > 60.0:
            start, sent = now, 0
        if sent + len(part) > SERVE_BYTES_PER_MIN:
            raise RemoteProtocolError(ErrorCode.OVER_BUDGET, "evidence served this minute")
        self._served[st.signer_id] = (start, sent + len(part))
        answer = EvidencePart(
            re=st.header.seq, evidence=req.evidence, offset=req.offset, total=total, part=part
        )
        self.out.answer(routing, st.signer, answer)

    def on_evidence(self, st: Statement) -> None:
        part = st.message
        assert isinstance(part, EvidencePart)
        pull = self.pulls.get(part.evidence)
        if pull is None or st.signer != pull.source or part.re != pull.asked:
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "no such evidence asked for")
        a = pull.accuse.message
        assert isinstance(a, Accuse)
        if part.total != a.size or part.offset != len(pull.data):
            self._abandon(pull, blame=Event.MALFORMED, why="evidence parts out of order")
            raise RemoteProtocolError(ErrorCode.INVALID_FIELD, "not the part asked for")
        pull.data += part.part
        if len(pull.data) < a.size:
            self._ask_evidence(pull)
            return
        data = bytes(pull.data)
        if evidence_id(data) != a.evidence:  # the peer served other bytes than were signed
            self._abandon(pull, blame=Event.MALFORMED, why="evidence of another hash")
            return
        self.out.emit(Judge(a.evidence, a.seller, a.fp, a.root, data))

    # ---- the driver's verdict --------------------------------------------------------

    def judged(self, proof: bytes, verdict: str, detail: str, seller_key: bytes) -> None:
        """The driver judged evidence: "lie" convicts the seller it bound (its public key
        `seller_key`, the one the ACCUSE named), "honest" (the weights compute these bytes)
        or "invalid" (it binds nobody, or not the seller and root the ACCUSE named) the
        accuser."""
        pull = self.pulls.pop(proof, None)
        if pull is None:
            return
        st, a = pull.accuse, pull.accuse.message
        assert isinstance(a, Accuse)
        data = bytes(pull.data)
        if verdict == "lie":
            self._convict(a.seller, seller_key, proof, st.frame, data)
            self.gossip.push(st.frame, MessageType.ACCUSE, {pull.source, st.signer}, None)
        else:
            self.scores.convict(
                st.signer_id, "false accusation", proof, st.frame, data, self.out.now.time()
            )
            self.out.event(
                FalseAccusation(
                    accuser=st.signer_id.hex()[:12], seller=a.seller.hex()[:12], why=detail[:160]
                )
            )
        self._next_pull()

    def _abandon(self, pull: _Pull, *, blame: Event | None, why: str) -> None:
        a = pull.accuse.message
        assert isinstance(a, Accuse)
        self.pulls.pop(a.evidence, None)
        if blame is not None:
            self.scores.record(node_id(pull.source), blame, self.out.now.time())
        self.out.event(EvidenceAbandoned(source=node_id(pull.source).hex()[:12], why=why))
        self._next_pull()

    def _next_pull(self) -> None:
        while self._waiting and len(self.pulls) < MAX_PULLS:
            st, source, routing = self._waiting.popleft()
            a = st.message
            assert isinstance(a, Accuse)
            if self.scores.conviction(a.seller) is None and a.evidence not in self.pulls:
                self._pull(st, source, routing)

    def expire(self) -> None:
        """Housekeeping: pulls that took too long go, and so do serving budgets whose
        minute is over (one entry per asker would otherwise outlive every stranger)."""
        now = self.out.now.monotonic()
        for pull in [p for p in self.pulls.values() if now - p.started > PULL_S]:
            self._abandon(pull, blame=None, why="too slow")
        for peer in [p for p, (start, _) in self._served.items() if now - start > 60.0]:
            del self._served[peer]

    def _convict(
        self, seller: bytes, seller_key: bytes, proof: bytes, accuse: bytes, data: bytes
    ) -> None:
        """The seller lied: kept for good with its proof, its ads dropped and refused."""
        self.scores.convict(seller, "lied", proof, accuse, data, self.out.now.time())
        self.unchecked.pop(seller, None)
        dropped = self.gossip.drop_signer(seller_key)
        self.out.event(
            Convicted(seller=seller.hex()[:12], proof=proof.hex()[:16], ads_dropped=dropped)
        )
