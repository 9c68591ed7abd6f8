"""What a part of the node core may do to the world, at the time of the input it handles.

Each part (p2p/_liveness.py, p2p/_gossip.py, p2p/_trading.py, p2p/_fraud.py) is given
this one object and nothing of the others' state: it seals statements, sends them to a
peer over this node's own connection (which §8.1a's dealer rule may open, or refuse),
answers on the connection a statement came on, drops connections and says what happened.
The driver drains what was emitted, in order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvx.protocol import Message, MessageType, node_id
from kvx.trust import Signer, Statement

from ._clock import Now
from ._dials import Connections
from ._events import Happening

if TYPE_CHECKING:
    from ._core import Output
    from ._fraud import Judge
    from ._market import Authorize


@dataclass(frozen=True)
class Send:
    """Send `frame` to the peer with Ed25519 key `key` (over this node's own connection)."""

    key: bytes
    frame: bytes
    mtype: MessageType


@dataclass(frozen=True)
class Reply:
    """Send `frame` back on the connection a statement arrived on (`routing` names it)."""

    routing: bytes
    frame: bytes
    mtype: MessageType


@dataclass(frozen=True)
class Disconnect:
    """Drop this node's connection to `key` (it died, restarted, or left the table)."""

    key: bytes


Address = Callable[[bytes], tuple[str | None, bool]]
"""A peer's control address, if known, and whether it is proven (§8.1a)."""


class Outbox:
    def __init__(self, signer: Signer, connections: Connections, now: Now) -> None:
        self.signer = signer
        self.connections = connections  # this node's own, to its peers (§8.1a)
        self.now = now  # the time of the input being handled
        self.address: Address = lambda key: (None, False)  # NodeCore sets its table's
        self._out: list[Output] = []

    def drain(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    def seal(
        self, message: Message, *, to: bytes | None = None, ttl_ms: int | None = None
    ) -> bytes:
        """`message` signed now; `to` is the Ed25519 key of the peer it is for."""
        return self.signer.seal(
            message,
            now_ms=self.now.now_ms(),
            to=None if to is None else node_id(to),
            ttl_ms=ttl_ms,
        )

    def send(self, key: bytes, message: Message) -> None:
        self.send_frame(key, self.seal(message, to=key), message.TYPE)

    def send_frame(self, key: bytes, frame: bytes, mtype: MessageType) -> None:
        """Send over this node's own connection to `key`, opening it if §8.1a allows;
        a statement to a key it may not dial now is dropped."""
        ctl, proven = self.address(key)
        drop, connect, ok = self.connections.reach(key, ctl, proven, self.now.monotonic())
        self._out.extend(Disconnect(k) for k in drop)
        if connect is not None:
            self._out.append(connect)
        if ok:
            self._out.append(Send(key, frame, mtype))

    def reply(self, routing: bytes, st: Statement, message: Message) -> None:
        self.reply_frame(routing, self.seal(message, to=st.signer), message.TYPE)

    def reply_frame(self, routing: bytes, frame: bytes, mtype: MessageType) -> None:
        self._out.append(Reply(routing, frame, mtype))

    def answer(self, routing: bytes | None, key: bytes, message: Message) -> None:
        """To `key`, on the connection its statement came on, or (`routing` None: it came
        on ours to `key`) over ours."""
        self.answer_frame(routing, key, self.seal(message, to=key), message.TYPE)

    def answer_frame(
        self, routing: bytes | None, key: bytes, frame: bytes, mtype: MessageType
    ) -> None:
        if routing is not None:
            self.reply_frame(routing, frame, mtype)
        else:
            self.send_frame(key, frame, mtype)

    def disconnect(self, key: bytes) -> None:
        self.connections.forget(key)
        self._out.append(Disconnect(key))

    def event(self, happening: Happening) -> None:
        """Note what happened, for the driver to log and count."""
        self._out.append(happening)

    def emit(self, work: Judge | Authorize) -> None:
        """Work for the driver to do off the loop, whose result comes back as an input."""
        self._out.append(work)
