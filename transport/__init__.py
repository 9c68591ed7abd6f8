"""kvx.transport: moving verified KV bytes between hosts, over TCP or UCX, into CPU or GPU
memory. A payload is returned whole and verified, or not at all."""

from ._destination import Destination, ScatterDestination
from ._fetch import (
    MAX_STRIPES,
    PREFERENCE,
    Fault,
    Fetched,
    FetchMiss,
    Offers,
    Source,
    Streamed,
    available_transports,
    choose_transport,
    fetch,
)
from ._port import DataLimits, DataPort
from ._sessions import Offer, Sessions
from ._stripes import Stripes
from ._tcp import TcpDataServer, TcpReceiver
from ._verify import Expected, StreamVerifier

__all__ = [
    "MAX_STRIPES",
    "PREFERENCE",
    "DataLimits",
    "DataPort",
    "Destination",
    "Expected",
    "Fault",
    "FetchMiss",
    "Fetched",
    "Offer",
    "Offers",
    "ScatterDestination",
    "Sessions",
    "Source",
    "StreamVerifier",
    "Streamed",
    "Stripes",
    "TcpDataServer",
    "TcpReceiver",
    "available_transports",
    "choose_transport",
    "fetch",
]
