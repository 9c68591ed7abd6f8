"""What a buyer may take without paying (spec §10.5).

Identities cost nothing, so a bound per identity alone is a bound on nothing: a swarm of
fresh keys takes one window each, as often as it likes. Two things a fresh key cannot
mint bound it here: paid history (a buyer may leave unpaid what it has paid for before,
plus one window as a stranger), and the network it speaks from (the strangers of one
/24 or /64 share one allowance an hour).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Allowance:
    """What a seller lets buyers leave unpaid within `span_ms` (the reference: an hour),
    in payment windows (§9.4), so that it scales with what one stream may take unpaid."""

    stranger_windows: int = 1
    """Each buyer's, beyond the bytes it has paid for."""
    network_windows: int = 4
    """All buyers' with no paid history that speak from one network, together."""
    span_ms: int = HOUR_MS


def source_network(address: str) -> str:
    """The network an address counts against: its /24 (IPv4) or /64 (IPv6); an
    IPv4-mapped IPv6 address is the IPv4 one. Anything unparsable is its own network."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
