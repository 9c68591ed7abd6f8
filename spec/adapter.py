"""The reference vector adapter: kvx's own codec behind the stdin/stdout protocol that
`kvx conformance --vectors-only` speaks (spec/README.md). Another implementation writes
the same small program around its own decoder.

    python -m kvx.conformance.adapter
"""

from __future__ import annotations

import json
import sys

import msgpack

from kvx.protocol import RemoteProtocolError

from ._wire_json import to_json


def verdict(request: dict) -> dict:
    from kvx.trust import Inbox, ReplayGuard

    ctx = request["context"]
    if "frame_fill" in request:
        fill = request["frame_fill"]
        frame = bytes.fromhex(fill["fill"]) * fill["length"]
    else:
        frame = bytes.fromhex(request["frame"])
    inbox = Inbox(bytes.fromhex(ctx["receiver"]), ReplayGuard())
    peer = bytes.fromhex(ctx["peer_curve_key"]) if ctx["peer_curve_key"] else None
    try:
        for prior in ctx["prior_frames"]:
            inbox.receive(bytes.fromhex(prior), now_ms=ctx["now_ms"], peer_curve_key=peer)
        st = inbox.receive(frame, now_ms=ctx["now_ms"], peer_curve_key=peer)
    except RemoteProtocolError as exc:
        return {"result": "reject", "code": int(exc.code)}
    body = msgpack.unpackb(msgpack.unpackb(frame)[2])
    return {"result": "valid", "type": st.type.name, "body": to_json(body)}


def main() -> None:
    for line in sys.stdin:
        print(json.dumps(verdict(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
