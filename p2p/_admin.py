"""The node's local admin API: msgpack requests over a ZeroMQ IPC socket in its data dir.

It is how the CLI and an embedded client on the same host talk to their node; it is not
part of the peer protocol, and the data dir's 0700 mode is what guards it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import zmq

from kvx.protocol import ErrorCode, KvxError, MessageType, RemoteProtocolError, node_id
from kvx.trust import Event

from ._clock import Now
from ._config import ADMIN_SOCKET, INFO_FILE
from ._peers import State
from ._store import PublishRequest

if TYPE_CHECKING:
    from kvx.trust import Identity

    from ._core import NodeCore


class Served(Protocol):
    """What the admin API reads of the node it serves (p2p/_node.py's Node)."""

    id: bytes
    identity: Identity
    core: NodeCore

    def held(self) -> dict[str, int]: ...

    def budgets(self) -> dict[str, dict[str, int]]: ...


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


def admin_socket(data_dir: str | Path) -> str:
    """The admin address of the node serving `data_dir`, or AdminError at once when none is:
    node.json exists while, and only while, a node serves, and names the node's process."""
    info = Path(data_dir).resolve() / INFO_FILE
    try:
        pid = json.loads(info.read_text())["pid"]
    except FileNotFoundError:
        raise AdminError(int(ErrorCode.UNAVAILABLE), f"no node is running in {data_dir}") from None
    except PermissionError:
        raise AdminError(
            int(ErrorCode.UNAVAILABLE),
            f"cannot read {info}: permission denied (run this as the user that runs the node)",
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdminError(int(ErrorCode.UNAVAILABLE), f"cannot read {info}: {exc}") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise AdminError(
            int(ErrorCode.UNAVAILABLE), f"the node in {data_dir} (PID {pid}) is gone"
        ) from None
    except PermissionError:
        pass  # it runs, as another user: the socket's own mode decides
    return f"ipc://{info.parent / ADMIN_SOCKET}"


def admin_call(data_dir: str | Path, op: str, timeout_s: float = 10.0, **args: Any) -> dict:
    """One request to the node running in `data_dir`; raises AdminError on its refusal."""
    address = admin_socket(data_dir)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.rcvtimeo = sock.sndtimeo = int(timeout_s * 1000)
    try:
        sock.connect(address)
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


def _verdict(core: Any, peer: bytes) -> str:
    """What this node holds against a peer, with the proof's id (spec §8.19)."""
    conviction = core.scores.conviction(peer)
    if conviction is not None:
        kind, proof = conviction
        return f"{'convicted' if kind == 'lied' else 'false accuser'} {proof.hex()}"
    accused = core.unchecked.get(peer)
    return f"accused, unchecked {accused[1].hex()}" if accused else ""


def answer(node: Served, req: dict, at: Now) -> dict:
    """The node's answer to one local admin request (the ops the CLI and clients use),
    at the time `at`."""
    op = req.get("op")
    core = node.core
    now = at.wall
    if op == "status":
        return {
            "node_id": node.id.hex(),
            "public_key": node.identity.public_key.hex(),
            "ctl": core.ctl,
            "data": [d.addr for d in core.data],
            "incarnation": core.incarnation,
            "peers": {s.name.lower(): sum(p.state == s for p in core.peers.all()) for s in State},
            "ads": len(core.index),
            "stored": len(core.store.entries()),
            "sent": {
                t.name: core.metrics.count("kvx_messages_sent_total", type=t.name)
                for t in MessageType
            },
            "received": {
                t.name: core.metrics.count("kvx_messages_received_total", type=t.name)
                for t in MessageType
            },
            "rejected": {
                c.name: core.metrics.count("kvx_rejections_total", code=c.name)
                for c in ErrorCode
                if core.metrics.count("kvx_rejections_total", code=c.name)
            },
            "shed": {
                s.labels["what"]: int(s.value)
                for metric in core.metrics.shed.collect()
                for s in metric.samples
                if s.name.endswith("_total")
            },
            "internal_errors": sum(
                int(s.value)
                for metric in core.metrics.internal_errors.collect()
                for s in metric.samples
                if s.name.endswith("_total")
            ),
            "held": node.held(),
            "budgets": node.budgets(),
            "degraded": [
                w for w in ("ledger", "scores") if core.metrics.value("kvx_degraded", what=w)
            ],
            "pid": os.getpid(),
        }
    if op == "savings":
        return core.metrics.savings()
    if op == "peers":
        rows = [
            {
                "node_id": node_id(p.key).hex(),
                "key": p.key.hex(),
                "ctl": p.ctl,
                "state": "left" if p.left else p.state.name.lower(),
                "inc": p.inc,
            }
            for p in core.peers.all()
        ]
        listed = {bytes.fromhex(r["node_id"]) for r in rows}
        # Verdicts outlive the peer table: a convicted seller is listed even when gone.
        for peer in [*core.scores.convicted(), *core.unchecked]:
            if peer not in listed:
                listed.add(peer)
                rows.append({"node_id": peer.hex(), "key": "", "ctl": "", "state": "-", "inc": 0})
        for row in rows:
            peer = bytes.fromhex(row["node_id"])
            row["score"] = round(core.scores.score(peer, now), 2)
            row["banned"] = core.scores.is_banned(peer, now)
            row["verdict"] = _verdict(core, peer)
        return {"peers": rows}
    if op == "accuse":  # a local client's evidence that a seller's KV is not its model's
        return {"proof": core.accuse(req["evidence"], at)}
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
                for a in core.index.ads()
            ]
        }
    if op == "publish":
        entry = core.publish(PublishRequest.from_admin(req), at)
        return {"root": entry.root}
    if op == "lookup":
        matched, ads = core.lookup(
            req["fp"],
            req.get("ns"),
            tuple(req["blocks"]),
            req.get("limit", 8),
            asker=core.id,
            now=at,
        )
        # Providers that failed this node (ranked last): a buyer tries them only when
        # nobody else is left, and never streams from them beside the others (§9.7).
        failed = [node_id(a.signer) for a in ads if core.scores.score(node_id(a.signer), now) < 0]
        return {"matched": matched, "ads": [a.frame for a in ads], "failed": failed}
    if op == "bought":  # a local client's purchase: logged and measured here
        for stage, seconds in req["timings"].items():
            if stage in core.metrics.stage:
                core.metrics.stage[stage].observe(seconds)
        for seller in req.get("sellers", [req["seller"]]):  # first in line next time
            core.scores.record(seller, Event.GOOD_DELIVERY, now)
        core.metrics.purchases.labels("bought").inc()
        core.metrics.purchased_bytes.inc(req["bytes"])
        core.metrics.bought_tokens.inc(req["tokens"])
        core.metrics.credits_spent.inc(req["price"])
        core.metrics.prefill_saved(float(req.get("saved_flops", 0.0)))
        core.event(
            "bought",
            seller=req["seller"].hex()[:12],
            bytes=req["bytes"],
            tokens=req["tokens"],
            price=req["price"],
            seconds=round(req["seconds"], 4),
        )
        return {}
    if op == "missed":  # a local client found nothing it could buy
        core.metrics.purchases.labels("missed").inc()
        core.event("missed", reason=str(req["reason"])[:200])
        return {}
    if op == "refused":  # a local client's model refuted KV that matched its root
        core.metrics.verify_failures.labels(str(req["check"])[:16]).inc()
        core.event(
            "refused",
            logging.WARNING,
            seller=req["seller"].hex()[:12],
            check=str(req["check"])[:16],
            detail=str(req["detail"])[:200],
        )
        return {}
    if op == "first_token":
        core.metrics.time_to_first_token.labels(req["source"]).observe(req["seconds"])
        core.metrics.prefill_measured(float(req.get("flops", 0.0)), req["seconds"])
        return {}
    if op == "report":  # a local client's verdict on a provider it dealt with
        core.scores.record(req["peer"], Event[req["event"]], now)
        return {}
    if op == "withdraw":
        core.withdraw(req["root"], at)
        return {}
    raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"unknown admin op {op!r}")
