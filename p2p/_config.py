"""A node's configuration: the [node] table of its TOML file, or command-line defaults.

Every number that shapes membership and gossip is here, so tests and benchmarks can
run fast timers and production can run patient ones, without code changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvx.protocol import DEFAULT_BLOCK_TOKENS, ConfigError, RemoteProtocolError, split_ctl
from kvx.transport import DataLimits
from kvx.trust import ConfigFile, Policy, load_policy
from kvx.trust._config import Section

from ._dialcheck import check_public_key
from ._index import IndexBudget

KEY_FILE = "node.key"
INFO_FILE = "node.json"
LEDGER_FILE = "ledger.db"
SCORES_FILE = "scores.db"
STORE_DIR = "store"
ADMIN_SOCKET = "admin.sock"


@dataclass(frozen=True)
class Bootstrap:
    """A peer to join through: its control address and Ed25519 public key."""

    ctl: str
    key: bytes

    @classmethod
    def parse(cls, text: str) -> Bootstrap:
        """`PUBKEYHEX@tcp://HOST:PORT`, or the path of that peer's node.json."""
        if "@" not in text:
            path = Path(text)
            if not path.is_file():
                raise ConfigError(
                    f"bootstrap {text!r}: expected PUBKEYHEX@tcp://HOST:PORT or the path of "
                    "a running peer's node.json"
                )
            try:
                info = json.loads(path.read_text())
                text = f"{info['public_key']}@{info['ctl']}"
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"bootstrap {path}: not a node.json") from None
        key_hex, _, ctl = text.partition("@")
        key = check_public_key(key_hex, "bootstrap key")
        try:
            split_ctl(ctl)
        except RemoteProtocolError as exc:
            raise ConfigError(f"bootstrap address {ctl!r}: {exc.detail}") from None
        return cls(ctl, key)


@dataclass(frozen=True)
class NodeConfig:
    data_dir: Path
    listen: str = "tcp://127.0.0.1:0"
    data_host: str = "127.0.0.1"
    data_port: int = 0  # TCP data port; 0: any free one (a firewall wants it fixed)
    ucx_port: int = 0  # UCX listener's port, with `ucx`; 0: any free one
    advertise: str | None = None  # the IP peers dial, when the binds are not it (NAT, wildcard)
    bootstrap: tuple[Bootstrap, ...] = ()
    metrics_port: int | None = 0  # 0: any free port; None: no metrics endpoint
    ucx: bool = False  # also serve KV over UCX (needs the 'ucx' extra)
    heartbeat_s: float = 1.0
    probes_per_heartbeat: int = 2
    suspect_after_s: float = 5.0
    dead_after_s: float = 12.0
    max_peers: int = 64
    fanout: int = 3
    indirect_probes: int = 3
    anti_entropy_s: float = 5.0
    rate_per_s: float = 200.0
    burst: int = 400
    handshakes_per_s: int = 50  # new CURVE connections admitted per source address, 4x burst
    advert_ttl_s: float = 3600.0
    memory_bytes: int = 1 << 30
    disk_bytes: int = 16 << 30
    # Budgets (spec §13.1): what one peer, and all of them, may make this node hold.
    max_ads: int = IndexBudget.ads
    max_ad_bytes: int = IndexBudget.bytes
    max_ads_per_signer: int = IndexBudget.ads_per_signer
    max_ad_bytes_per_signer: int = IndexBudget.bytes_per_signer
    replay_total: int = 262_144
    replay_per_signer: int = 65_536
    reconnect_s: float = 1.0  # first retry of an outgoing connection; doubles up to the max
    reconnect_max_s: float = 30.0
    data_connections: int = DataLimits.connections
    data_streams: int = DataLimits.streams
    data_streams_per_buyer: int = DataLimits.streams_per_buyer
    data_header_s: float = DataLimits.header_s
    data_stall_s: float = DataLimits.stall_s
    data_min_rate: int = DataLimits.min_rate
    payment_window_bytes: int = 64 << 20
    leave_grace_s: float = 10.0  # on SIGTERM: how long streams already admitted may finish
    # Models whose weights this node judges fraud proofs with (spec §8.19), and the block
    # size their fingerprints are taken at: a GGUF file or a model directory each.
    judge_models: tuple[Path, ...] = ()
    judge_block: int = DEFAULT_BLOCK_TOKENS
    policy: Policy = field(default_factory=Policy)

    @property
    def key_file(self) -> Path:
        return self.data_dir / KEY_FILE

    @property
    def admin_address(self) -> str:
        return f"ipc://{self.data_dir.resolve() / ADMIN_SOCKET}"

    @property
    def index_budget(self) -> IndexBudget:
        return IndexBudget(
            ads=self.max_ads,
            bytes=self.max_ad_bytes,
            ads_per_signer=self.max_ads_per_signer,
            bytes_per_signer=self.max_ad_bytes_per_signer,
        )

    @property
    def data_limits(self) -> DataLimits:
        return DataLimits(
            connections=self.data_connections,
            streams=self.data_streams,
            streams_per_buyer=self.data_streams_per_buyer,
            header_s=self.data_header_s,
            stall_s=self.data_stall_s,
            min_rate=self.data_min_rate,
        )

    def with_args(self, **changes: Any) -> NodeConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


BUDGETS = (
    "max_ads",
    "max_ad_bytes",
    "max_ads_per_signer",
    "max_ad_bytes_per_signer",
    "replay_total",
    "replay_per_signer",
    "reconnect_s",
    "reconnect_max_s",
    "data_connections",
    "data_streams",
    "data_streams_per_buyer",
    "data_header_s",
    "data_stall_s",
    "data_min_rate",
    "payment_window_bytes",
)
"""[node] keys that set a budget; each is a positive number."""
SIZES = frozenset(
    {"max_ad_bytes", "max_ad_bytes_per_signer", "data_min_rate", "payment_window_bytes"}
)
"""Budgets in bytes (a rate in bytes a second): they may be written "2GiB" too."""


def load_node_config(path: str | os.PathLike[str]) -> NodeConfig:
    """Read [node] (and the trust tables) from a node's TOML config file."""
    config = ConfigFile(path)
    config.only_tables(("node", "policy", "namespace", "scores"))
    sec = Section(config, "node")
    positive = lambda v: None if v > 0 else "must be positive"  # noqa: E731
    port_or_any = lambda v: None if 0 <= v <= 65535 else "must be a port, or 0 for any"  # noqa: E731
    data_dir = sec.take("data_dir", str, "")
    if not data_dir:
        raise sec.error("data_dir", "is required")
    boots = []
    for entry in sec.take("bootstrap", list, []):
        try:
            boots.append(Bootstrap.parse(str(entry)))
        except ConfigError as exc:
            raise sec.error("bootstrap", str(exc)) from None
    d = NodeConfig(data_dir=Path(data_dir))
    metrics = sec.take("metrics_port", int, 0, lambda v: None if v >= -1 else "is -1 or a port")
    cfg = NodeConfig(
        data_dir=(config.path.parent / Path(data_dir).expanduser()),
        listen=sec.take("listen", str, d.listen),
        data_host=sec.take("data_host", str, d.data_host),
        advertise=sec.take("advertise", str, d.advertise),
        data_port=sec.take("data_port", int, d.data_port, port_or_any),
        ucx_port=sec.take("ucx_port", int, d.ucx_port, port_or_any),
        ucx=sec.take("ucx", bool, d.ucx),
        bootstrap=tuple(boots),
        metrics_port=None if metrics == -1 else metrics,
        heartbeat_s=sec.take("heartbeat_s", float, d.heartbeat_s, positive),
        leave_grace_s=sec.take("leave_grace_s", float, d.leave_grace_s, positive),
        probes_per_heartbeat=sec.take(
            "probes_per_heartbeat", int, d.probes_per_heartbeat, positive
        ),
        suspect_after_s=sec.take("suspect_after_s", float, d.suspect_after_s, positive),
        dead_after_s=sec.take("dead_after_s", float, d.dead_after_s, positive),
        max_peers=sec.take("max_peers", int, d.max_peers, positive),
        fanout=sec.take("fanout", int, d.fanout, positive),
        indirect_probes=sec.take(
            "indirect_probes",
            int,
            d.indirect_probes,
            lambda v: None if v >= 0 else "must be 0 (off) or more",
        ),
        anti_entropy_s=sec.take("anti_entropy_s", float, d.anti_entropy_s, positive),
        rate_per_s=sec.take("rate_per_s", float, d.rate_per_s, positive),
        burst=sec.take("burst", int, d.burst, positive),
        handshakes_per_s=sec.take("handshakes_per_s", int, d.handshakes_per_s, positive),
        advert_ttl_s=sec.take("advert_ttl_s", float, d.advert_ttl_s, positive),
        memory_bytes=sec.take_bytes("memory_bytes", d.memory_bytes, positive),
        disk_bytes=sec.take_bytes("disk_bytes", d.disk_bytes, positive),
        judge_models=tuple(
            config.path.parent / Path(str(m)).expanduser()
            for m in sec.take("judge_models", list, [])
        ),
        judge_block=sec.take("judge_block", int, d.judge_block, positive),
        **{
            name: sec.take_bytes(name, getattr(d, name), positive)
            if name in SIZES
            else sec.take(name, type(getattr(d, name)), getattr(d, name), positive)
            for name in BUDGETS
        },
        policy=load_policy(path),
    )
    sec.finish()
    if cfg.dead_after_s <= cfg.suspect_after_s:
        raise config.error("node", "dead_after_s", "must be longer than suspect_after_s")
    return cfg
