"""The node's Prometheus metrics, in a registry of its own (one per node, even in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.peers = Gauge("kvx_peers", "Peers in the table, by state", ["state"], registry=r)
        for state in ("alive", "suspect", "dead"):
            self.peers.labels(state).set(0)  # zero is a reading, not a missing series
        self.ads = Gauge("kvx_ads_known", "Advertisements in the index", registry=r)
        self.hits = Counter("kvx_lookup_hits", "LOOKUPs that matched a prefix", registry=r)
        self.misses = Counter("kvx_lookup_misses", "LOOKUPs that matched nothing", registry=r)
        self.bytes_in = Counter("kvx_bytes_in", "Control bytes received", registry=r)
        self.bytes_out = Counter("kvx_bytes_out", "Control and data bytes sent", registry=r)
        self.credits = Gauge("kvx_credits", "Net receipted credits owed to this node", registry=r)
        self.rejections = Counter(
            "kvx_rejections", "Frames refused, by error code", ["code"], registry=r
        )
        self.sent = Counter(
            "kvx_messages_sent", "Control messages sent, by type", ["type"], registry=r
        )
        self.received = Counter(
            "kvx_messages_received", "Statements accepted, by type", ["type"], registry=r
        )
        self.internal_errors = Counter(
            "kvx_internal_errors",
            "Frames and timer rounds lost to a fault of kvx itself, by where",
            ["where"],
            registry=r,
        )
        self.held = Gauge(
            "kvx_held",
            "What the node holds for its peers, against its budgets",
            ["what"],
            registry=r,
        )
        self.degraded = Gauge(
            "kvx_degraded",
            "1 while a part of the node cannot write to disk",
            ["what"],
            registry=r,
        )
        for what in ("ledger", "scores"):
            self.degraded.labels(what).set(0)

    def serve(self, port: int) -> int:
        """Serve /metrics on 127.0.0.1; returns the port actually bound."""
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        return server.server_port

    def value(self, name: str, **labels: str) -> float:
        sample = self.registry.get_sample_value(name, labels or None)
        return 0.0 if sample is None else sample
