"""Peer-supplied network addresses (spec §8.1a), checked where they are decoded.

A control or data address a stranger sends ends in `connect()`, so it is parsed here
and nowhere later: an IP literal (IPv6 in brackets) and a port in 1-65535. Host names
are refused on the wire, so that no peer can make a node resolve names of its choosing
or hide a loopback or private address behind one; addresses no peer can listen on
(unspecified, multicast, broadcast) are refused too. Whether loopback and private
ranges are acceptable is the receiving node's policy, not the codec's.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import RemoteProtocolError
from ._schema import Invalid, Str

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPV4_TAIL = re.compile(rf"(?:^|:){_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}$")
"""Dotted-quad IPv4, alone or as an IPv6 address's last 32 bits: no leading zeros."""
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

CTL_SCHEME = "tcp://"


def _host_port(text: str, path: str) -> tuple[IPAddress, int]:
    """`HOST:PORT` with HOST an IPv4 literal or a bracketed IPv6 literal; raises Invalid."""
    parsed = _parse(text)
    if isinstance(parsed, str):
        raise Invalid(path, parsed)
    return parsed


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> tuple[IPAddress, int] | str:
    """The IP and port, or why not. Cached: peer lists repeat the same addresses, and
    parsing IP literals dominated a node's cost of a PEERS frame; the cache is bounded,
    so a stranger's stream of new addresses only evicts."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        return f"{text!r:.80} is not HOST:PORT"
    if host.startswith("["):
        if not host.endswith("]"):
            return f"{text!r:.80}: an IPv6 host is written [ADDR]"
        host = host[1:-1]
        if ":" not in host:
            return f"{text!r:.80}: only IPv6 hosts are bracketed"
    elif ":" in host:
        return f"{text!r:.80}: an IPv6 host is written [ADDR]"
    if not _PORT.fullmatch(port) or int(port) > 65535:
        return f"{text!r:.80}: the port is not 1-65535 in decimal without leading zeros"
    if "%" in host:
        return f"{text!r:.80}: a zone id names an interface of the sender's, not an address"
    if "." in host and not _IPV4_TAIL.search(host):
        return f"{text!r:.80}: an IPv4 octet is 0-255 without leading zeros"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{text!r:.80}: the host is not an IP literal"
    # An IPv4-mapped IPv6 address is judged by the IPv4 address it maps (§8.1a).
    judged = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    if judged.is_unspecified or judged.is_multicast or judged == _BROADCAST:
        return f"{text!r:.80}: no peer can be reached at {ip}"
    return ip, int(port)


def _ctl(text: str, path: str) -> tuple[IPAddress, int]:
    """A control address, `tcp://HOST:PORT`; raises Invalid."""
    if not text.startswith(CTL_SCHEME):
        raise Invalid(path, f"{text!r:.80} is not tcp://HOST:PORT")
    return _host_port(text[len(CTL_SCHEME) :], path)


def _remote(
    split: Callable[[str, str], tuple[IPAddress, int]], text: str, path: str
) -> tuple[IPAddress, int]:
    try:
        return split(text, path)
    except Invalid as exc:
        raise RemoteProtocolError(exc.code, str(exc)) from None


def split_host_port(text: str, path: str = "address") -> tuple[IPAddress, int]:
    """The IP and port of a data address; INVALID_FIELD if it breaks §8.1a."""
    return _remote(_host_port, text, path)


def split_ctl(text: str, path: str = "ctl") -> tuple[IPAddress, int]:
    """The IP and port of a control address; INVALID_FIELD if it breaks §8.1a."""
    return _remote(_ctl, text, path)


@dataclass(frozen=True)
class CtlAddress(Str):
    """Wire type of a control address: `tcp://HOST:PORT`, 1-256 bytes."""

    lo: int = 1
    hi: int = 256

    def decode(self, value: object, path: str) -> str:
        text = super().decode(value, path)
        _ctl(text, path)
        return text

    encode = decode


ENDPOINT_TRANSPORTS = frozenset({"tcp", "ucx"})
"""Transports whose data address is HOST:PORT; others' addresses are opaque (and unused)."""


def check_data_address(transport: str, address: str, path: str) -> None:
    if transport in ENDPOINT_TRANSPORTS:
        _host_port(address, path)
