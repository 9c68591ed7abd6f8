"""The suite's side of a connection: an ordinary peer with a fresh identity, speaking to the
target over ZeroMQ with CURVE, as spec §4 describes — nothing of the target's insides."""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq

from kvx.protocol import RELAYABLE, Header, Hello, Message, Peers, RemoteProtocolError, node_id
from kvx.trust import (
    Identity,
    Inbox,
    Signer,
    Statement,
    curve_public_key,
    make_curve_client,
    make_curve_server,
    open_envelope,
    seal,
)

ANSWER_S = 3.0
HELLO = Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)
"""The suite introduces itself as a peer that listens nowhere: it only ever asks."""


class Failed(Exception):
    """A requirement was not met; the message says how."""


class Skipped(Exception):
    """The case cannot run against this target (the reason says why)."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Session:
    def __init__(
        self, ctx: zmq.Context, target: str, target_key: bytes, identity: Identity | None = None
    ) -> None:
        self.ctx = ctx
        self.target = target
        self.target_key = target_key
        self.target_id = node_id(target_key)
        self.identity = identity or Identity.generate()
        self.inbox = Inbox(self.identity.node_id)
        self._seq = now_ms() * 1000
        self.sock = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        make_curve_client(sock, self.identity, self.target_key)
        sock.connect(self.target)
        return sock

    def reconnect(self) -> None:
        self.sock.close()
        self.sock = self._connect()

    def close(self) -> None:
        self.sock.close()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def header(self, **over: Any) -> Header:
        fields = {
            "iat": now_ms(),
            "exp": now_ms() + 60_000,
            "seq": self.next_seq(),
            "to": self.target_id,
        }
        fields.update(over)
        return Header(**fields)

    def frame(self, message: Message, signer: Identity | None = None, **over: Any) -> bytes:
        if message.TYPE in RELAYABLE:
            over.setdefault("to", None)
        return seal(signer or self.identity, message, self.header(**over))

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def receive(self, timeout: float = ANSWER_S) -> list[Statement]:
        """Everything the target sends within `timeout`, verified (from the target)."""
        out, deadline = [], time.monotonic() + timeout
        curve = curve_public_key(self.target_key)
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                break
            try:
                out.append(
                    self.inbox.receive(self.sock.recv(), now_ms=now_ms(), peer_curve_key=curve)
                )
            except RemoteProtocolError as exc:
                raise Failed(f"the target sent an invalid frame: {exc}") from None
        return out

    def answer(self, seq: int, timeout: float = ANSWER_S) -> Statement | None:
        """The target's answer (a statement with `re` = seq), or None if it stays silent."""
        deadline = time.monotonic() + timeout
        curve = curve_public_key(self.target_key)
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                return None
            try:
                st = self.inbox.receive(self.sock.recv(), now_ms=now_ms(), peer_curve_key=curve)
            except RemoteProtocolError as exc:
                raise Failed(f"the target sent an invalid frame: {exc}") from None
            if getattr(st.message, "re", None) == seq:
                return st
        return None

    def hello(self, within: float = ANSWER_S) -> Statement:
        """Introduce ourselves (spec §8.2); the answer must be PEERS. A HELLO met with
        silence is sent again until `within` has passed: a target may still be working
        through statements it took earlier, which its rate limit drops unanswered."""
        deadline = time.monotonic() + within
        while True:
            frame = self.frame(HELLO)
            self.send(frame)
            left = min(ANSWER_S, deadline - time.monotonic())
            answer = self.answer(open_envelope(frame).header.seq, max(left, 0.0))
            if answer is not None or time.monotonic() >= deadline:
                break
        if answer is None or not isinstance(answer.message, Peers):
            raise Failed(f"HELLO was answered with {_name(answer)}, not PEERS")
        return answer


def _name(st: Statement | None) -> str:
    return "silence" if st is None else st.type.name


class Listener:
    """A suite peer that listens, as a node does, and answers every HELLO with PEERS: a
    live third party the target can probe (§8.17). It introduces itself with `join`."""

    def __init__(self, s: Session) -> None:
        self.identity = Identity.generate()
        self.sock = s.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        make_curve_server(self.sock, self.identity)
        self.ctl = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.session = Session(s.ctx, s.target, s.target_key, self.identity)
        self._signer = Signer(self.identity)
        self._stop = threading.Event()
        self.heard: list[Statement] = []  # every statement the target sent it unasked
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self.session.send(self.session.frame(Hello(ctl=self.ctl, data=(), inc=1)))
        if not any(isinstance(st.message, Peers) for st in self.session.receive(1.0)):
            raise Failed("the target did not answer the listener's HELLO with PEERS")

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            routing, frame = self.sock.recv_multipart()[:2]
            try:
                st = open_envelope(frame)
            except RemoteProtocolError:
                continue
            self.heard.append(st)
            if isinstance(st.message, Hello):
                peers = Peers(peers=(), re=st.header.seq)
                answer = self._signer.seal(peers, now_ms=now_ms(), to=st.signer_id)
                self.sock.send_multipart([routing, answer])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        self.session.close()
