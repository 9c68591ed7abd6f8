"""The node's local admin API: msgpack requests over a ZeroMQ IPC socket in its data dir.

It is how the CLI and an embedded client on the same host talk to their node; it is not
part of the peer protocol, and the data dir's 0700 mode is what guards it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import zmq

from kvx.protocol import ErrorCode, KvxError

from ._config import ADMIN_SOCKET, INFO_FILE


class AdminError(KvxError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


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
        sock.send(pack({"op": op, **args}))
        try:
            reply = unpack(sock.recv())
        except zmq.Again:
            raise AdminError(
                int(ErrorCode.TIMEOUT), f"the node in {data_dir} did not answer"
            ) from None
    finally:
        sock.close()
    if not reply.get("ok"):
        raise AdminError(reply.get("code", int(ErrorCode.INTERNAL)), reply.get("error", "failed"))
    return reply
