"""Hypothesis strategies derived from the wire schema, so every message is covered alike."""

import dataclasses

from hypothesis import assume
from hypothesis import strategies as st

from kvx.protocol import MESSAGE_CLASSES, RELAYABLE, Header, MessageType, max_lifetime_ms
from kvx.protocol._address import CtlAddress
from kvx.protocol._messages import ADDRESS
from kvx.protocol._schema import Array, Bin, Bool, OneOf, Str, Struct, UInt


def _reachable(ip) -> bool:
    """As §8.1a judges it: an IPv4-mapped IPv6 address by the IPv4 address it maps."""
    judged = ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip
    return not (judged.is_unspecified or judged.is_multicast or str(judged) == "255.255.255.255")


ips = st.ip_addresses().filter(_reachable)
host_ports = st.builds(
    lambda ip, port: f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}",
    ips,
    st.integers(1, 65535),
)
"""Data addresses as the spec allows them: an IP literal and a port (§8.1a)."""


def for_wire(t) -> st.SearchStrategy:
    if isinstance(t, CtlAddress):
        return host_ports.map(lambda a: "tcp://" + a)
    if t is ADDRESS:
        return host_ports
    if isinstance(t, UInt):
        return st.integers(t.lo, t.hi)
    if isinstance(t, Bin):
        return st.binary(min_size=t.lo, max_size=min(t.hi, t.lo + 40))
    if isinstance(t, Str):
        if t.pattern:
            return st.from_regex(t.pattern, fullmatch=True).filter(
                lambda s: t.lo <= len(s.encode()) <= t.hi
            )
        return st.text(max_size=t.hi // 4).filter(lambda s: len(s.encode()) >= t.lo)
    if isinstance(t, OneOf):
        return st.sampled_from(t.choices)
    if isinstance(t, Bool):
        return st.booleans()
    if isinstance(t, Array):
        return st.lists(for_wire(t.item), min_size=t.lo, max_size=min(t.hi, t.lo + 3)).map(tuple)
    if isinstance(t, Struct):
        return structs(t.cls)
    raise TypeError(t)


def _checked(obj):
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except Exception:
            assume(False)
    return obj


def structs(cls) -> st.SearchStrategy:
    fields = {}
    for f in dataclasses.fields(cls):
        s = for_wire(f.metadata["wire"])
        fields[f.name] = s if f.default is dataclasses.MISSING else st.none() | s
    return st.builds(cls, **fields).map(_checked)


@st.composite
def headers(draw, mtype: MessageType) -> Header:
    iat = draw(st.integers(0, 2**62))
    exp = iat + draw(st.integers(1, max_lifetime_ms(mtype)))
    to = None if mtype in RELAYABLE else draw(st.binary(min_size=32, max_size=32))
    return Header(iat=iat, exp=exp, seq=draw(st.integers(0, 2**64 - 1)), to=to)


messages = st.sampled_from(sorted(MESSAGE_CLASSES)).flatmap(
    lambda t: st.tuples(headers(t), structs(MESSAGE_CLASSES[t]))
)
"""(header, message) pairs of every type, each valid by construction."""
