"""A node's access policy: who may talk to it, publish, buy, and on how much credit.

Loaded once at start from the node's TOML config; anything wrong in it stops the node
with the file, line and reason, rather than running with a policy nobody wrote.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kvx.protocol import ConfigError, ErrorCode, Namespace, RemoteProtocolError

from ._config import ConfigFile, Section, read_secret
from ._credit import Allowance

ANYONE = "*"


def _node_ids(section: Section, key: str) -> frozenset[bytes] | None:
    """A list of hex node ids, or ["*"] for anyone (None)."""
    values = section.take(key, list, None)
    if values is None:
        return None
    if values == [ANYONE]:
        return None
    ids = set()
    for value in values:
        try:
            raw = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise section.error(key, f"{value!r} is not a node id (64 hex digits) or '*'")
        ids.add(raw)
    return frozenset(ids)


@dataclass(frozen=True)
class NamespaceRule:
    """A private namespace this node belongs to, and who in it may publish or buy."""

    name: str
    namespace: Namespace
    publishers: frozenset[bytes] | None = None  # None: any member
    buyers: frozenset[bytes] | None = None

    @property
    def id(self) -> bytes:
        assert self.namespace.id is not None
        return self.namespace.id


@dataclass(frozen=True)
class ScoreRules:
    threshold: float = -50.0
    """A peer whose score falls below this is ignored for `cooldown_s`."""
    cooldown_s: float = 600.0
    half_life_s: float = 3600.0
    """Scores decay towards zero, halving over this time."""


def _denied(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.DENIED, reason)


@dataclass(frozen=True)
class VerifyPolicy:
    """What a buyer checks of bought KV against its own model before using it (spec
    §12.2): `off`; `layer0` (every position's layer-0 keys and values); `spot:K` (layer 0,
    and K positions drawn at random recomputed at every layer); `spot:K/N` (the same, the
    deep part on one purchase in N drawn at random); `full` (every position at every
    layer: as costly as the prefill it replaces)."""

    layer0: bool = True
    spots: int = 16
    every: int = 1
    """The deep spots run on one purchase in `every`, drawn by the buyer's randomness."""
    full: bool = False

    @classmethod
    def parse(cls, text: str) -> VerifyPolicy:
        if text == "off":
            return cls(layer0=False, spots=0)
        if text == "layer0":
            return cls(spots=0)
        if text == "full":
            return cls(full=True)
        name, _, rest = text.partition(":")
        count, _, every = rest.partition("/")
        if (
            name == "spot"
            and count.isdigit()
            and 1 <= int(count) <= 4096
            and (not every or (every.isdigit() and 1 <= int(every) <= 1_000_000))
        ):
            return cls(spots=int(count), every=int(every or 1))
        raise ConfigError(
            f"verify is off, layer0, spot:K, spot:K/N (K in 1…4096, N ≥ 1) or full, not {text!r}"
        )

    @classmethod
    def of(cls, policy: VerifyPolicy | str) -> VerifyPolicy:
        """A policy, or its name parsed."""
        return cls.parse(policy) if isinstance(policy, str) else policy

    def __str__(self) -> str:
        if self.full:
            return "full"
        if not self.layer0:
            return "off"
        if not self.spots:
            return "layer0"
        return f"spot:{self.spots}" + (f"/{self.every}" if self.every > 1 else "")

    @property
    def enabled(self) -> bool:
        return self.layer0 or self.full


DEFAULT_VERIFY = VerifyPolicy(spots=16, every=32)
"""spot:16/32: layer 0 on every purchase, 16 deep spots on one in 32. bench/verify.py's
choice: the most deep checking that stays within 10% of a bought first token at 4K
tokens on SmolLM2-135M on this project's 2-core machine (layer 0 costs ~8% there, a
deep forward of 16 spots ~55%: one purchase in 32 adds ~2% on average)."""


@dataclass(frozen=True)
class Policy:
    allow: frozenset[bytes] | None = None
    """Node ids that may talk to this node; None lets anyone not denied."""
    deny: frozenset[bytes] = frozenset()
    max_price: int = 10**12
    """The most this node pays for one fetch, in micro-credits."""
    credit_limit: int = 10**9
    """Default unpaid balance a buyer may run up with this node, in micro-credits."""
    peer_credit_limits: Mapping[bytes, int] = field(default_factory=dict)
    unpaid: Allowance = field(default_factory=Allowance)
    """Bytes buyers may take unpaid within an hour: each beyond what it has paid for, and
    the new buyers of one network together (spec §10.5)."""
    namespaces: tuple[NamespaceRule, ...] = ()
    scores: ScoreRules = ScoreRules()
    encrypt_at_rest: bool = False
    allow_loopback: bool = True
    """Whether peers may name loopback addresses (127/8, ::1): a swarm on one host needs
    them; a node on an open network should refuse them, so strangers cannot aim it at
    its own host's services."""
    allow_private: bool = True
    """Whether peers may name private, link-local and other non-global addresses."""
    verify: VerifyPolicy = DEFAULT_VERIFY
    """What this node's clients check of bought KV unless they say otherwise."""
    seal_public: bool = False
    """Whether this node's clients ask for public KV's streams to be sealed (§9.6)."""

    def check_address(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        """Raise DENIED for a peer-supplied address this node's policy keeps it from dialing.
        An IPv4-mapped IPv6 address is judged by the IPv4 address it maps, or
        [::ffff:127.0.0.1] would pass for a global address."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback:
            if not self.allow_loopback:
                raise _denied(f"{ip} is a loopback address")
        elif not ip.is_global and not self.allow_private:
            raise _denied(f"{ip} is not a global address")

    def check_peer(self, peer: bytes) -> None:
        """Raise DENIED for a peer this node must not deal with."""
        if peer in self.deny:
            raise _denied("this node id is on the deny list")
        if self.allow is not None and peer not in self.allow:
            raise _denied("this node id is not on the allow list")

    def credit_limit_for(self, peer: bytes) -> int:
        return self.peer_credit_limits.get(peer, self.credit_limit)

    def namespace(self, ns_id: bytes) -> NamespaceRule | None:
        return next((rule for rule in self.namespaces if rule.id == ns_id), None)

    def check_namespace(self, peer: bytes, ns_id: bytes | None, *, publish: bool) -> None:
        """May `peer` publish into (or buy from) namespace `ns_id`? Public: anyone allowed."""
        if ns_id is None:
            return
        rule = self.namespace(ns_id)
        if rule is None:
            raise RemoteProtocolError(ErrorCode.NOT_FOUND, "this node is not in that namespace")
        who = rule.publishers if publish else rule.buyers
        if who is not None and peer not in who:
            raise _denied(f"may not {'publish to' if publish else 'buy from'} {rule.name}")


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read [policy], [policy.peers.ID], [[namespace]] and [scores] from a node config."""
    config = ConfigFile(path)
    base = config.path.parent
    sec = Section(config, "policy")
    allow = _node_ids(sec, "allow")
    deny = _node_ids(sec, "deny") or frozenset()
    non_negative = lambda v: None if v >= 0 else "must not be negative"  # noqa: E731
    max_price = sec.take("max_price", int, Policy.max_price, non_negative)
    credit_limit = sec.take("credit_limit", int, Policy.credit_limit, non_negative)
    windows = Allowance.stranger_windows, Allowance.network_windows
    unpaid = Allowance(
        stranger_windows=sec.take("stranger_unpaid_windows", int, windows[0], non_negative),
        network_windows=sec.take("network_unpaid_windows", int, windows[1], non_negative),
    )
    encrypt = sec.take("encrypt_at_rest", bool, False)
    loopback = sec.take("allow_loopback", bool, Policy.allow_loopback)
    private = sec.take("allow_private", bool, Policy.allow_private)
    seal_public = sec.take("seal_public", bool, Policy.seal_public)
    peers_table = sec.take("peers", dict, {})
    verify_text = sec.take("verify", str, str(DEFAULT_VERIFY))
    try:
        verify = VerifyPolicy.parse(verify_text)
    except ConfigError as exc:
        raise sec.error("verify", str(exc)) from None
    sec.finish()

    limits = {}
    for key in peers_table:
        try:
            peer = bytes.fromhex(key)
        except ValueError:
            peer = b""
        if len(peer) != 32:
            raise config.error(f"policy.peers.{key}", None, "table name must be a node id")
        peer_sec = Section(config, f"policy.peers.{key}")
        limits[peer] = peer_sec.take("credit_limit", int, credit_limit, non_negative)
        peer_sec.finish()

    namespaces = []
    raw_ns = config.data.get("namespace", [])
    if not isinstance(raw_ns, list):
        raise config.error("namespace", None, "use [[namespace]] (an array of tables)")
    for i in range(len(raw_ns)):
        ns = Section(config, "namespace", i)
        name = ns.take("name", str, "", lambda v: None if v else "must not be empty")
        if not name:
            raise ns.error(None, "each [[namespace]] needs a name")
        secret_path = ns.take("secret_file", str, "")
        if not secret_path:
            raise ns.error(None, f"namespace {name!r} needs secret_file")
        try:
            secret = read_secret(base / Path(secret_path).expanduser())
        except ConfigError as exc:
            raise ns.error("secret_file", str(exc)) from None
        rule = NamespaceRule(
            name=name,
            namespace=Namespace(secret),
            publishers=_node_ids(ns, "publish"),
            buyers=_node_ids(ns, "buy"),
        )
        ns.finish()
        namespaces.append(rule)

    sc = Section(config, "scores")
    positive = lambda v: None if v > 0 else "must be positive"  # noqa: E731
    scores = ScoreRules(
        threshold=sc.take("threshold", float, ScoreRules.threshold),
        cooldown_s=sc.take("cooldown_s", float, ScoreRules.cooldown_s, positive),
        half_life_s=sc.take("half_life_s", float, ScoreRules.half_life_s, positive),
    )
    sc.finish()
    return Policy(
        allow=allow,
        deny=deny,
        max_price=max_price,
        credit_limit=credit_limit,
        peer_credit_limits=limits,
        unpaid=unpaid,
        namespaces=tuple(namespaces),
        scores=scores,
        encrypt_at_rest=encrypt,
        allow_loopback=loopback,
        allow_private=private,
        verify=verify,
        seal_public=seal_public,
    )
