"""The node's local admin API: msgpack requests over a ZeroMQ IPC socket in its data dir.

It is how the CLI and an embedded client on the same host talk to their node; it is not
part of the peer protocol, and the data dir's 0700 mode is what guards it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from kvx.protocol import ErrorCode, KVLayout, KvxError, MessageType, RemoteProtocolError, node_id
from kvx.trust import Event

from ._config import ADMIN_SOCKET, INFO_FILE
from ._peers import State

if TYPE_CHECKING:
    from ._node import Node


class AdminError(KvxError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def request(op: str, args: dict[str, Any]) -> bytes:
    return pack({"op": op, **args})


def result(data: bytes) -> dict:
    """The node's reply, or AdminError with its code and reason."""
    reply = unpack(data)
    if not reply.get("ok"):
        raise AdminError(reply.get("code", int(ErrorCode.INTERNAL)), reply.get("error", "failed"))
    return reply


def admin_call(data_dir: str | Path, op: str, timeout_s: float = 10.0, **args: Any) -> dict:
    """One request to the node running in `data_dir`; raises AdminError on its refusal."""
    path = Path(data_dir).resolve() / ADMIN_SOCKET
    if not (path.parent / INFO_FILE).exists():  # written while, and only while, it serves
        raise AdminError(int(ErrorCode.UNAVAILABLE), f"no node is running in {data_dir}")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.rcvtimeo = sock.sndtimeo = int(timeout_s * 1000)
    try:
        sock.connect(f"ipc://{path}")
        sock.send(request(op, args))
        try:
            data = sock.recv()
        except zmq.Again:
            raise AdminError(
                int(ErrorCode.TIMEOUT), f"the node in {data_dir} did not answer"
            ) from None
    finally:
        sock.close()
    return result(data)


async def answer(node: Node, req: dict) -> dict:
    """The node's answer to one local admin request (the ops the CLI and clients use)."""
    op = req.get("op")
    now = time.time()
    if op == "status":
        return {
            "node_id": node.id.hex(),
            "ctl": node.ctl,
            "data": [d.addr for d in node.data],
            "incarnation": node.incarnation,
            "peers": {s.name.lower(): sum(p.state == s for p in node.peers.all()) for s in State},
            "ads": len(node.index),
            "stored": len(node.store.entries()),
            "sent": {
                t.name: node.metrics.value("kvx_messages_sent_total", type=t.name)
                for t in MessageType
            },
            "internal_errors": sum(
                s.value
                for metric in node.metrics.internal_errors.collect()
                for s in metric.samples
                if s.name.endswith("_total")
            ),
            "held": node.held(),
            "degraded": [
                w for w in ("ledger", "scores") if node.metrics.value("kvx_degraded", what=w)
            ],
            "pid": os.getpid(),
        }
    if op == "peers":
        return {
            "peers": [
                {
                    "node_id": node_id(p.key).hex(),
                    "key": p.key.hex(),
                    "ctl": p.ctl,
                    "state": p.state.name.lower(),
                    "inc": p.inc,
                    "score": round(node.scores.score(node_id(p.key), now), 2),
                    "banned": node.scores.is_banned(node_id(p.key), now),
                }
                for p in node.peers.all()
            ]
        }
    if op == "ads":
        return {
            "ads": [
                {
                    "signer": node_id(a.signer).hex(),
                    "seq": a.seq,
                    "root": a.message.root.hex(),
                    "blocks": len(a.message.blocks),
                    "price": a.message.price,
                    "ns": a.message.ns.hex() if a.message.ns else None,
                    "exp_ms": a.exp_ms,
                }
                for a in node.index.ads()
            ]
        }
    if op == "publish":
        entry = await node.publish(
            fp=req["fp"],
            ns=req.get("ns"),
            layout=KVLayout(**req["layout"]),
            blocks=tuple(req["blocks"]),
            payload=req["payload"],
            chunk=req["chunk"],
            params=req.get("params", 0),
        )
        return {"root": entry.root}
    if op == "lookup":
        matched, ads = node.lookup(
            req["fp"], req.get("ns"), tuple(req["blocks"]), req.get("limit", 8), asker=node.id
        )
        return {"matched": matched, "ads": [a.frame for a in ads]}
    if op == "report":  # a local client's verdict on a provider it dealt with
        node.scores.record(req["peer"], Event[req["event"]], now)
        return {}
    if op == "withdraw":
        await node.withdraw(req["root"])
        return {}
    raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"unknown admin op {op!r}")
