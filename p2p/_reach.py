"""Where a node binds and what it tells peers to dial: the two differ behind NAT, in a
container, or on a host with several interfaces.

A node binds its control and data ports on `listen` and `data_host`, which may be a
wildcard (all interfaces) only when `advertise` names the one IP that peers dial. What
it advertises must be an address a peer would accept (spec §8.1a) and that its own
policy would accept from a peer; otherwise the node refuses to start, since every
HELLO and ADVERTISE it sent would name a place no peer can reach.
"""

from __future__ import annotations

import ipaddress

from kvx.protocol import CTL_SCHEME, ConfigError, RemoteProtocolError, split_host_port

from ._config import NodeConfig


def _ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise ConfigError(f"{what} {text!r}: not an IP address") from None


def _host_port(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_host(listen: str) -> str:
    """The host part of `listen` (tcp://HOST:PORT), as written."""
    if not listen.startswith(CTL_SCHEME):
        raise ConfigError(f"listen {listen!r}: expected tcp://IP:PORT")
    host, sep, port = listen[len(CTL_SCHEME) :].rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"listen {listen!r}: expected tcp://IP:PORT")
    return host


def check_reach(config: NodeConfig) -> None:
    """Refuse, in one line, a node whose peers could not dial what it would advertise."""
    binds = {"listen": bind_host(config.listen), "data_host": config.data_host}
    ips = {name: _ip(host, name) for name, host in binds.items()}
    if config.advertise is None:
        for name, ip in ips.items():
            if ip.is_unspecified:
                raise ConfigError(
                    f"{name} {binds[name]}: a wildcard binds every interface but is no address"
                    " a peer can dial; name the one peers dial with --advertise IP"
                )
        named = list(ips.values())
        what = "listen/data_host"
    else:
        named = [_ip(config.advertise, "advertise")]
        what = "advertise"
    for ip in named:
        try:
            split_host_port(_host_port(str(ip), "1"))
        except RemoteProtocolError as exc:
            raise ConfigError(f"{what}: no peer can dial {ip}: {exc.detail}") from None
        try:
            config.policy.check_address(ip)
        except RemoteProtocolError as exc:
            raise ConfigError(
                f"{what}: this node's own [policy] refuses {ip} from peers ({exc.detail}),"
                " so peers with the same policy could not dial it"
            ) from None


def advertised(bound: str, advertise: str | None) -> str:
    """`bound` (HOST:PORT, or tcp://HOST:PORT) with its host replaced by `advertise`."""
    scheme = CTL_SCHEME if bound.startswith(CTL_SCHEME) else ""
    if advertise is None:
        return bound
    port = bound.rpartition(":")[2]
    return scheme + _host_port(str(_ip(advertise, "advertise")), port)
