"""The node's Prometheus metrics, in a registry of its own (one per node, even in one
process). The driver counts here what the core says happened (p2p/_events.py); the core
holds no metric."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ._events import (
    Accepted,
    Degraded,
    Dropped,
    Earned,
    Happening,
    InternalError,
    Looked,
    Rejected,
    Shed,
)


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
        self.bytes_out = Counter("kvx_bytes_out", "Control bytes sent", registry=r)
        # Savings, seen from both sides: what this node sold, and what its clients bought.
        self.data_bytes_sent = Counter(
            "kvx_data_bytes_sent", "KV bytes streamed to buyers (the data channel)", registry=r
        )
        self.sold_tokens = Counter(
            "kvx_sold_tokens", "Tokens of KV delivered whole and receipted", registry=r
        )
        self.credits_earned = Counter(
            "kvx_credits_earned", "Micro-credits buyers' receipts paid this node", registry=r
        )
        self.bought_tokens = Counter(
            "kvx_bought_tokens", "Tokens of KV this node's clients bought", registry=r
        )
        self.credits_spent = Counter(
            "kvx_credits_spent", "Micro-credits this node's clients paid for KV", registry=r
        )
        self.flops_saved = Counter(
            "kvx_prefill_flops_saved", "Prefill FLOPs this node's clients bought", registry=r
        )
        self.seconds_saved = Counter(
            "kvx_prefill_seconds_saved",
            "Prefill seconds this node's clients saved: FLOPs bought at the prefill rate they"
            " measured",
            registry=r,
        )
        self.prefill_rate = Gauge(
            "kvx_prefill_flops_per_second",
            "The prefill rate this node's clients measured (0: none measured yet)",
            registry=r,
        )
        self._rate = 0.0  # FLOPs a second; 0 until a client measured one
        self._unpriced = 0.0  # FLOPs bought before any prefill rate was measured
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
        self.shed = Counter(
            "kvx_shed",
            "Work this node left undone to pace itself or its peers, by what",
            ["what"],
            registry=r,
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
        # What this node's clients saw, reported by them after each purchase (the client
        # runs in the agent's process; its node is where an operator looks).
        self.purchases = Counter(
            "kvx_purchases", "Purchases by this node's clients, by result", ["result"], registry=r
        )
        self.purchased_bytes = Counter(
            "kvx_purchased_bytes", "KV bytes bought by this node's clients", registry=r
        )
        self.verify_failures = Counter(
            "kvx_verify_failures",
            "Deliveries this node's clients refused: KV their own model refuted, by check",
            ["check"],
            registry=r,
        )
        for check in ("layer0", "deep"):
            self.verify_failures.labels(check)
        self.stage = {
            stage: Histogram(
                f"kvx_{stage}_seconds",
                f"Seconds a client spent in a purchase's {text}",
                buckets=buckets,
                registry=r,
            )
            for stage, text, buckets in (
                ("lookup", "lookup (asking this node)", _buckets(0.0005, 13)),
                ("negotiation", "negotiation (QUOTE_REQUEST to ACCEPT)", _buckets(0.001, 14)),
                ("transfer", "transfer (data channel, verified)", _buckets(0.005, 15)),
            )
        }
        self.time_to_first_token = Histogram(
            "kvx_time_to_first_token_seconds",
            "Seconds from a client's request to its model's first token, prefix bought or not",
            ["source"],
            buckets=_buckets(0.01, 14),
            registry=r,
        )
        for source in ("bought", "prefill"):
            self.time_to_first_token.labels(source)
        for result in ("bought", "missed"):
            self.purchases.labels(result)

    def note(self, happening: Happening) -> None:
        """Count what the core said happened."""
        match happening:
            case Accepted(type=mtype):
                self.received.labels(mtype).inc()
            case Dropped(code=code) | Rejected(code=code):
                self.rejections.labels(code).inc()
            case Shed(what=what):
                self.shed.labels(what).inc()
            case Looked(matched=matched):
                (self.hits if matched else self.misses).inc()
            case Earned(credits=credits, tokens=tokens):
                self.credits_earned.inc(credits)
                self.sold_tokens.inc(tokens)
            case InternalError(where=where):
                self.internal_errors.labels(where).inc()
            case Degraded(what=what):
                self.degraded.labels(what).set(1)

    def serve(self, port: int) -> int:
        """Serve /metrics on 127.0.0.1; returns the port actually bound."""
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        return server.server_port

    def value(self, name: str, **labels: str) -> float:
        sample = self.registry.get_sample_value(name, labels or None)
        return 0.0 if sample is None else sample

    def prefill_measured(self, flops: float, seconds: float) -> None:
        """A client prefilled `flops` in `seconds`: the rate that prices what it saves."""
        if flops <= 0 or seconds <= 0:
            return
        rate = flops / seconds
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        self.prefill_rate.set(self._rate)
        if self._unpriced:
            self.seconds_saved.inc(self._unpriced / self._rate)
            self._unpriced = 0.0

    def prefill_saved(self, flops: float) -> None:
        """A client bought KV instead of computing `flops` of prefill."""
        self.flops_saved.inc(flops)
        if self._rate:
            self.seconds_saved.inc(flops / self._rate)
        else:
            self._unpriced += flops

    def savings(self) -> dict[str, float]:
        """What this node sold and what its clients bought, as the savings row reads it."""
        m = self
        return {
            "sold_tokens": m.count("kvx_sold_tokens_total"),
            "sold_bytes": m.count("kvx_data_bytes_sent_total"),
            "credits_earned": m.count("kvx_credits_earned_total"),
            "bought_tokens": m.count("kvx_bought_tokens_total"),
            "bought_bytes": m.count("kvx_purchased_bytes_total"),
            "credits_spent": m.count("kvx_credits_spent_total"),
            "prefill_flops_saved": m.value("kvx_prefill_flops_saved_total"),
            "prefill_seconds_saved": m.value("kvx_prefill_seconds_saved_total"),
            "prefill_flops_per_second": self._rate,
        }

    def count(self, name: str, **labels: str) -> int:
        """A counter's value as the whole number it is (Prometheus keeps floats)."""
        return int(self.value(name, **labels))


def _buckets(first: float, count: int) -> tuple[float, ...]:
    """Upper bounds doubling from `first`: latencies spread over orders of magnitude."""
    return tuple(round(first * 2**i, 6) for i in range(count))
