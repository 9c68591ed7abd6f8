"""kvx.transport: moving verified KV bytes between hosts, over TCP or UCX, into CPU or GPU
memory. A payload is returned whole and verified, or not at all."""

from ._destination import Destination, ScatterDestination
from ._fetch import (
    PREFERENCE,
    Fault,
    Fetched,
    FetchMiss,
    Source,
    available_transports,
    choose_transport,
    fetch,
)
from ._sessions import Offer, Sessions
from ._tcp import DataLimits, TcpDataServer, fetch_tcp, receive_stream, serve_stream
from ._verify import Expected, StreamVerifier

__all__ = [
    "PREFERENCE",
    "DataLimits",
    "Destination",
    "Expected",
    "Fault",
    "FetchMiss",
    "Fetched",
    "Offer",
    "ScatterDestination",
    "Sessions",
    "Source",
    "StreamVerifier",
    "TcpDataServer",
    "available_transports",
    "choose_transport",
    "fetch",
    "fetch_tcp",
    "receive_stream",
    "serve_stream",
]
