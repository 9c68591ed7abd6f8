"""The node's local admin API: msgpack requests over a ZeroMQ IPC socket in its data dir.

It is how the CLI and an embedded client on the same host talk to their node; it is not
part of the peer protocol, and the data dir's 0700 mode is what guards it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import zmq

from kvx.protocol import ErrorCode, KvxError, MessageType, RemoteProtocolError, node_id
from kvx.trust import Event

from ._clock import Now
from ._config import ADMIN_SOCKET, INFO_FILE
from ._events import Bought, Happening, Missed, Refused
from ._store import PublishRequest

if TYPE_CHECKING:
    from kvx.trust import Identity

    from ._core import NodeCore
    from ._metrics import Metrics


class Served(Protocol):
    """What the admin API reads of the node it serves (p2p/_node.py's Node)."""

    id: bytes
    identity: Identity
    core: NodeCore
    metrics: Metrics

    def held(self) -> dict[str, int]: ...

    def budgets(self) -> dict[str, dict[str, int]]: ...

    def happened(self, happening: Happening) -> None: ...


class AdminError(KvxError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def request(op: str, args: dict[str, Any]) -> bytes:
    return pack({"op": op, **args})


def result(data: bytes) -> dict[str, Any]:
    """The node's reply, or AdminError with its code and reason."""
    reply: dict[str, Any] = unpack(data)
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


def admin_call(
    data_dir: str | Path, op: str, timeout_s: float = 10.0, **args: Any
) -> dict[str, Any]:
    """One request to the node running in `data_dir`; raises AdminError on its refusal."""
    address = admin_socket(data_dir)
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
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


Handler = Callable[["Served", dict[str, Any], Now], dict[str, Any]]
"""One admin op: the node, the request, and the time it is answered at."""


def _status(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    core, metrics = node.core, node.metrics
    return {
        "node_id": node.id.hex(),
        "public_key": node.identity.public_key.hex(),
        "ctl": core.liveness.ctl,
        "data": [d.addr for d in core.liveness.data],
        "incarnation": core.liveness.incarnation,
        "peers": core.liveness.counts(),
        "ads": len(core.gossip.index),
        "stored": len(core.store.entries()),
        "sent": {
            t.name: metrics.count("kvx_messages_sent_total", type=t.name) for t in MessageType
        },
        "received": {
            t.name: metrics.count("kvx_messages_received_total", type=t.name) for t in MessageType
        },
        "rejected": {
            c.name: n
            for c in ErrorCode
            if (n := metrics.count("kvx_rejections_total", code=c.name))
        },
        "shed": {
            s.labels["what"]: int(s.value)
            for metric in metrics.shed.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        },
        "internal_errors": sum(
            int(s.value)
            for metric in metrics.internal_errors.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        ),
        "held": node.held(),
        "budgets": node.budgets(),
        "degraded": [w for w in ("ledger", "scores") if metrics.value("kvx_degraded", what=w)],
        "pid": os.getpid(),
    }


def _savings(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    return node.metrics.savings()


def _peers(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    core, now = node.core, at.wall
    rows: list[dict[str, Any]] = [
        {
            "node_id": node_id(p.key).hex(),
            "key": p.key.hex(),
            "ctl": p.ctl,
            "state": "left" if p.left else p.state.name.lower(),
            "inc": p.inc,
        }
        for p in core.liveness.peers.all()
    ]
    listed = {bytes.fromhex(r["node_id"]) for r in rows}
    # Verdicts outlive the peer table: a convicted seller is listed even when gone.
    for peer in [*core.scores.convicted(), *core.fraud.unchecked]:
        if peer not in listed:
            listed.add(peer)
            rows.append({"node_id": peer.hex(), "key": "", "ctl": "", "state": "-", "inc": 0})
    for row in rows:
        peer = bytes.fromhex(row["node_id"])
        row["score"] = round(core.scores.score(peer, now), 2)
        row["banned"] = core.scores.is_banned(peer, now)
        row["verdict"] = core.verdict(peer)
    return {"peers": rows}


def _accuse(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    """A local client's evidence that a seller's KV is not its model's."""
    return {"proof": node.core.accuse(req["evidence"], at)}


def _ads(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
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
            for a in node.core.gossip.index.ads()
        ]
    }


def _publish(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    return {"root": node.core.publish(PublishRequest.from_admin(req), at).root}


def _lookup(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    core = node.core
    fp, ns, blocks, limit = req["fp"], req.get("ns"), tuple(req["blocks"]), req.get("limit", 8)
    matched, ads = core.lookup(fp, ns, blocks, limit, asker=core.id, now=at)
    # Providers that failed this node (ranked last): a buyer tries them only when
    # nobody else is left, and never streams from them beside the others (§9.7).
    failed = [node_id(a.signer) for a in ads if core.scores.score(node_id(a.signer), at.wall) < 0]
    return {"matched": matched, "ads": [a.frame for a in ads], "failed": failed}


def _bought(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    """A local client's purchase: logged and measured here."""
    core, metrics = node.core, node.metrics
    for stage, seconds in req["timings"].items():
        if stage in metrics.stage:
            metrics.stage[stage].observe(seconds)
    for seller in req.get("sellers", [req["seller"]]):  # first in line next time
        core.scores.record(seller, Event.GOOD_DELIVERY, at.wall)
    metrics.purchases.labels("bought").inc()
    metrics.purchased_bytes.inc(req["bytes"])
    metrics.bought_tokens.inc(req["tokens"])
    metrics.credits_spent.inc(req["price"])
    metrics.prefill_saved(float(req.get("saved_flops", 0.0)))
    seconds = round(req["seconds"], 4)
    seller = req["seller"].hex()[:12]
    node.happened(Bought(seller, req["bytes"], req["tokens"], req["price"], seconds))
    return {}


def _missed(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    """A local client found nothing it could buy."""
    node.metrics.purchases.labels("missed").inc()
    node.happened(Missed(reason=str(req["reason"])[:200]))
    return {}


def _refused(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    """A local client's model refuted KV that matched its root."""
    check = str(req["check"])[:16]
    node.metrics.verify_failures.labels(check).inc()
    node.happened(Refused(req["seller"].hex()[:12], check, str(req["detail"])[:200]))
    return {}


def _first_token(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    metrics = node.metrics
    metrics.time_to_first_token.labels(req["source"]).observe(req["seconds"])
    metrics.prefill_measured(float(req.get("flops", 0.0)), req["seconds"])
    return {}


def _report(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    """A local client's verdict on a provider it dealt with."""
    node.core.scores.record(req["peer"], Event[req["event"]], at.wall)
    return {}


def _withdraw(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    node.core.withdraw(req["root"], at)
    return {}


HANDLERS: dict[str, Handler] = {
    "status": _status,
    "savings": _savings,
    "peers": _peers,
    "accuse": _accuse,
    "ads": _ads,
    "publish": _publish,
    "lookup": _lookup,
    "bought": _bought,
    "missed": _missed,
    "refused": _refused,
    "first_token": _first_token,
    "report": _report,
    "withdraw": _withdraw,
}


def answer(node: Served, req: dict[str, Any], at: Now) -> dict[str, Any]:
    """The node's answer to one local admin request, at the time `at`."""
    handler = HANDLERS.get(req.get("op", ""))
    if handler is None:
        raise RemoteProtocolError(
            ErrorCode.UNEXPECTED_MESSAGE, f"unknown admin op {req.get('op')!r}"
        )
    return handler(node, req, at)
