"""Gossip at scale: one advertisement spreading through 100, 1,000 and 10,000 simulated
nodes, each running kvx's real node core (p2p/_core.py) over a simulated network.

    python bench/sim.py [--sizes 100,1000,10000] [--seed 1] [--parts ...] [--json OUT]

For each size: the share of nodes that index the advertisement (reach), the seconds
and the rounds (relay hops) until they do (p50, p99), the ADVERTISE frames and bytes
sent per node for it, and the wall time of the simulation itself; the same with 1% of
frames lost (up to 1,000 nodes). Then, at 1,000 nodes: a tenth crashing as it is
published and restarting 2 s later; a tenth hostile (withholding, eclipsing, making up
news, advertising every chain at price 0), with honest reach and honest buyers'
purchases. At 300 nodes, a partition into halves for 20 s. At 50 nodes: how often a
node suspects a healthy peer with 1% loss (300 s), and how long one dead link between
two healthy nodes makes them suspect each other, with and without indirect probes. At
1,000 nodes that each hold 2,000 ads: a tenth flooding within their limits and a tenth
rejoining empty (`--parts floods`, 9 minutes here, so not run unless asked: honest
reach, rejoined holdings, honest-honest bans). The baseline in the same run is what push
gossip predicts: log2(N) rounds. `--parts` runs some of these only."""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvx.p2p import NodeConfig
from kvx.p2p._buying import MAX_PROVIDERS
from kvx.p2p._events import Happening, PeerSuspect
from kvx.p2p._peers import State
from kvx.protocol import Advertise, KVLayout, MessageType, node_id, parse_envelope
from kvx.testing._sim import Network, Simulation
from kvx.trust import open_envelope

WARM_S = 2.0  # the swarm runs this long before the advertisement is published
KNOWN = 64  # each node starts with a full peer table: a formed swarm, not one joining
SPREAD_S = 5.0  # and this long after
SUSPICION_NODES, SUSPICION_S = 50, 300.0
LINK_S = 120.0


class Suspicions:
    """Counts the cores' suspicions of a peer: every node in these runs is healthy."""

    def __init__(self, sim: Simulation) -> None:
        self.count = 0
        sim.on_happening = self._happened

    def _happened(self, node: int, happening: Happening) -> None:
        if isinstance(happening, PeerSuspect):
            self.count += 1


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def spread(n: int, seed: int, loss: float) -> dict:
    started = time.perf_counter()
    sim = Simulation(n, seed=seed, network=Network(loss=loss))
    with sim:
        suspicions = Suspicions(sim)
        sim.start(known=KNOWN)
        sim.run_until(WARM_S)
        suspicions.count = 0
        ad = sim.publish(0)
        reached = {0: (0.0, 0)}  # node -> (seconds after publishing, relay hops)
        sent = {"frames": 0, "bytes": 0}

        def seen(to: int, sender: int, frame: bytes) -> None:
            if parse_envelope(frame).type == MessageType.ADVERTISE:
                sent["frames"] += 1
                sent["bytes"] += len(frame)
            if to not in reached and ad in sim.cores[to].gossip.index:
                hops = reached.get(sender, (0.0, 0))[1] + 1
                reached[to] = (sim.clock.now - WARM_S, hops)

        sim.on_receive = seen
        sim.run_until(WARM_S + SPREAD_S)
    seconds = [s for s, _ in reached.values()]
    hops = [h for _, h in reached.values()]
    return {
        "nodes": n,
        "loss": loss,
        "reach": len(reached) / n,
        "seconds_p50": round(percentile(seconds, 0.5), 3),
        "seconds_p99": round(percentile(seconds, 0.99), 3),
        "rounds_p50": percentile(hops, 0.5),
        "rounds_p99": percentile(hops, 0.99),
        "log2n": round(math.log2(n), 2),
        "advertise_frames_per_node": round(sent["frames"] / n, 2),
        "advertise_bytes_per_node": round(sent["bytes"] / n),
        "suspicions": suspicions.count,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def holders(sim: Simulation, ad: tuple[bytes, int], group: set[int], seconds: float) -> dict:
    """Run `seconds` more; when each node of `group` came to hold `ad`, from now."""
    since, got = sim.clock.now, {}

    def seen(to: int, sender: int, frame: bytes) -> None:
        if to in group and to not in got and ad in sim.cores[to].gossip.index:
            got[to] = sim.clock.now - since

    sim.on_receive = seen
    sim.run_until(since + seconds)
    return got


def churn(n: int, seed: int, share: float = 0.1) -> dict:
    """A tenth of the nodes crash as the advertisement is published and restart 2 s
    later with nothing but their identity: how soon does every node hold it?"""
    started = time.perf_counter()
    sim = Simulation(n, seed=seed)
    with sim:
        sim.start(known=KNOWN)
        sim.run_until(WARM_S)
        churned = sim.rng.sample(range(1, n), int(share * n))
        for i in churned:
            sim.crash(i)
        before = dict(sim.traffic.frames), dict(sim.traffic.bytes)
        ad = sim.publish(0)  # the only advertisement of the run
        sim.run_until(WARM_S + 2.0)
        for i in churned:
            sim.restart(i, known=16)
        got = holders(sim, ad, set(churned), 10.0)
        reach = sum(ad in core.gossip.index for core in sim.cores) / n
        frames, size = (
            now.get("ADVERTISE", 0) - then.get("ADVERTISE", 0)
            for now, then in zip((sim.traffic.frames, sim.traffic.bytes), before, strict=True)
        )
    seconds = list(got.values()) or [float("inf")]
    return {
        "nodes": n,
        "churned": len(churned),
        "reach": reach,
        "advertise_frames_sent_per_node": round(frames / n, 2),
        "advertise_bytes_sent_per_node": round(size / n),
        "restarted_reached": len(got) / len(churned),
        "restarted_seconds_p50": round(percentile(seconds, 0.5), 3),
        "restarted_seconds_p99": round(percentile(seconds, 0.99), 3),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def hostile(n: int, seed: int, share: float = 0.1, buyers: int = 200) -> dict:
    """A tenth of the nodes cheat (kvx/testing/_sim.py's HostileCore: they withhold gossip and
    DIGEST answers, name only each other in PEERS, make up news, and advertise every
    chain they hear of at price 0 without holding it). How far and fast does an honest
    advertisement still go among the honest nodes, and can honest buyers buy it?"""
    started = time.perf_counter()
    rng = random.Random(seed)
    cheats = frozenset(rng.sample(range(1, n), int(share * n)))
    honest = [i for i in range(n) if i not in cheats]
    sim = Simulation(n, seed=seed, hostile=cheats)
    with sim:
        sim.start(known=KNOWN)
        sim.run_until(WARM_S)
        document = (rng.randbytes(32), (rng.randbytes(32), rng.randbytes(32)))
        ad = sim.publish(0, document=document)
        frame = next(a.frame for a in sim.cores[0].gossip.index.ads() if a.id == ad)
        reached: dict[int, float] = {0: 0.0}
        sent = {"frames": 0, "bytes": 0, "all": 0}

        def seen(to: int, sender: int, delivered: bytes) -> None:
            if parse_envelope(delivered).type == MessageType.ADVERTISE:
                sent["all"] += 1
                if delivered == frame:
                    sent["frames"] += 1
                    sent["bytes"] += len(delivered)
            if to not in reached and ad in sim.cores[to].gossip.index:
                reached[to] = sim.clock.now - WARM_S

        sim.on_receive = seen
        sim.run_until(WARM_S + SPREAD_S)
        honest_reached = [s for i, s in reached.items() if i not in cheats]
        sample = rng.sample(honest[1:], min(buyers, len(honest) - 1))
        first_listed = sum(
            any(
                sim.index[a.signer] not in cheats
                for a in sim.cores[b].lookup(
                    document[0], None, document[1], 8, asker=b"", now=sim.clock.at()
                )[1]
            )
            for b in sample
        )
        needed, attempts, after = [], [], []  # per buyer: purchases until one delivers,
        # the attempts they took, and the attempts of the purchase after it
        for b in sample:
            tries = [sim.purchase(b, *document) for _ in range(3)]
            needed.append(next((k + 1 for k, t in enumerate(tries) if t), 4))
            attempts.append(sum(t or MAX_PROVIDERS for t in tries[: needed[-1]]))
            after += tries[needed[-1] : needed[-1] + 1]
    return {
        "nodes": n,
        "hostile": len(cheats),
        "reach": round(len(honest_reached) / len(honest), 4),
        "seconds_p50": round(percentile(honest_reached, 0.5), 3),
        "seconds_p99": round(percentile(honest_reached, 0.99), 3),
        "advertise_frames_per_node": round(sent["frames"] / n, 2),
        "advertise_bytes_per_node": round(sent["bytes"] / n),
        "all_advertise_frames_per_node": round(sent["all"] / n, 2),
        "buyers": len(sample),
        "first_lookup_lists_honest": round(first_listed / len(sample), 3),
        "bought_in_first_purchase": round(needed.count(1) / len(sample), 3),
        "bought_within_two_purchases": round(sum(k <= 2 for k in needed) / len(sample), 3),
        "attempts_until_bought_p50": percentile(attempts, 0.5),
        "attempts_until_bought_p99": percentile(attempts, 0.99),
        "attempts_in_the_purchase_after_max": max(after, default=None),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def floods(n: int, seed: int, held: int = 2000, share: float = 0.1, seconds: float = 15.0) -> dict:
    """Every node holds `held` advertisements. A tenth of the nodes flood within their
    limits (each sends one of its peers 180 valid HELLOs a second for 3 s, which it must
    answer; the flooders read nothing, to spare the simulation their side), a tenth
    restart with nothing and pull every advertisement back from their peers (the
    anti-entropy that used to ban honest peers), and an honest node publishes a new one.
    Honest reach of the new advertisement and when, how much of what they held the
    restarted nodes have back, and honest nodes banned by honest nodes."""
    started = time.perf_counter()
    rng = random.Random(seed)
    sim = Simulation(n, seed=seed)
    with sim:
        sim.start(known=KNOWN)
        layout = KVLayout(dtype="float16", layers=1, kv_heads=1, head_dim=8, block=16)
        signers = range(1, 1 + held // 10)  # ten advertisements each
        ads = []
        for k in range(held):
            i = signers[k % len(signers)]
            block = rng.randbytes(32)
            ad = Advertise(
                fp=b"\x0f" * 32,
                layout=layout,
                blocks=(block,),
                root=block,
                chunk=1 << 16,
                price=1,
                ctl=sim.address(i),
                data=sim._data(i),
            )
            now_ms = sim.clock.now_ms()
            ads.append(open_envelope(sim.cores[i].signer.seal(ad, now_ms=now_ms, ttl_ms=3_600_000)))
        for core in sim.cores:
            for st in ads:
                core.gossip.index.add(st)
        sim.run_until(WARM_S)
        flooders = rng.sample(range(1, n), int(share * n))
        rejoining = rng.sample([i for i in range(1, n) if i not in flooders], int(share * n))
        honest = [i for i in range(n) if i not in flooders]
        for i in rejoining:
            sim.crash(i)
        sim.run_until(WARM_S + 0.5)
        for i in rejoining:
            sim.restart(i, known=16)
        ad = sim.publish(0)
        reached: dict[int, float] = {0: 0.0}

        def seen(to: int, sender: int, frame: bytes) -> None:
            if to not in reached and ad in sim.cores[to].gossip.index:
                reached[to] = sim.clock.now - WARM_S - 0.5

        sim.on_receive = seen
        targets = {
            f: rng.sample([p.key for p in sim.cores[f].liveness.peers.alive()], 1) for f in flooders
        }
        sim.down.update(flooders)  # they send; what they would read is not simulated
        t = sim.clock.now
        while t < WARM_S + 0.5 + seconds:
            if t < WARM_S + 0.5 + 3.0:  # the flood: 18 each tenth of a second
                for f in flooders:
                    core = sim.cores[f]
                    for key in targets[f]:
                        for _ in range(18):
                            core.out.send(key, core.liveness.hello())
                    sim._drain(f)
            t += 0.1
            sim.run_until(t)
        honest_reached = [s for i, s in reached.items() if i not in flooders]
        back = [len(sim.cores[i].gossip.index) for i in rejoining]
        keys = {sim.cores[i].identity.public_key for i in honest}
        banned = sum(
            sim.cores[i].scores.is_banned(node_id(k), sim.clock.time())
            for i in honest
            for k in keys
        )
        dropped = sum(
            sim.cores[i].metrics.value("kvx_rejections_total", code="RATE_LIMITED") for i in honest
        )
    return {
        "nodes": n,
        "held": held,
        "flooders": len(flooders),
        "rejoining": len(rejoining),
        "reach": round(len(honest_reached) / len(honest), 4),
        "seconds_p50": round(percentile(honest_reached, 0.5), 3),
        "seconds_p99": round(percentile(honest_reached, 0.99), 3),
        "rejoined_hold_p50": percentile(back, 0.5) / held,
        "rejoined_hold_min": min(back) / held,
        "honest_honest_bans": banned,
        "flood_frames_dropped_by_honest": int(dropped),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def partition(n: int, seed: int, cut_s: float = 20.0) -> dict:
    """Half the swarm is cut off from the other half as an advertisement is published
    on one side, for `cut_s` (long enough for each side to think the other dead); then
    the network heals. How soon does every node hold the advertisement again?"""
    started = time.perf_counter()
    sim = Simulation(n, seed=seed)
    with sim:
        sim.start(known=KNOWN)
        sim.run_until(WARM_S)
        side = set(range(n // 2))
        sim.partition(side)
        ad = sim.publish(0)
        sim.run_until(WARM_S + cut_s)
        during = sum(ad in core.gossip.index for core in sim.cores) / n
        sim.heal()
        got = holders(sim, ad, set(range(n)) - side, 20.0)
        reach = sum(ad in core.gossip.index for core in sim.cores) / n
    seconds = list(got.values()) or [float("inf")]
    return {
        "nodes": n,
        "cut_s": cut_s,
        "reach_during": round(during, 3),
        "reach_after": reach,
        "other_side_reached": round(len(got) / (n - len(side)), 3),
        "seconds_after_heal_p50": round(percentile(seconds, 0.5), 3),
        "seconds_after_heal_p99": round(percentile(seconds, 0.99), 3),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def one_dead_link(seed: int, indirect_probes: int) -> dict:
    """Every frame between two healthy nodes is lost, every other link works: how long
    does each hold the other suspect or dead, with and without indirect probes?"""
    config = lambda d: NodeConfig(  # noqa: E731
        data_dir=d, metrics_port=None, indirect_probes=indirect_probes
    )
    sim = Simulation(SUSPICION_NODES, seed=seed, config=config)
    with sim:
        suspicions = Suspicions(sim)
        sim.start(known=16)
        a = sim.cores[0]
        b = a.liveness.peers.alive()[0].key
        sim.link(0, sim.index[b], loss=1.0)
        bad = 0
        for t in range(1, int(LINK_S) + 1):
            sim.run_until(float(t))
            bad += a.liveness.peers.get(b).state != State.ALIVE
    return {
        "indirect_probes": indirect_probes,
        "seconds": LINK_S,
        "seconds_held_suspect_or_dead": bad,
        "suspicions": suspicions.count,
    }


def false_suspicions(seed: int) -> dict:
    """Healthy nodes, 1% of frames lost: every suspicion is a false one."""
    started = time.perf_counter()
    sim = Simulation(SUSPICION_NODES, seed=seed, network=Network(loss=0.01))
    with sim:
        suspicions = Suspicions(sim)
        sim.start(known=KNOWN)
        sim.run_until(SUSPICION_S)
    node_hours = SUSPICION_NODES * SUSPICION_S / 3600
    return {
        "nodes": SUSPICION_NODES,
        "loss": 0.01,
        "node_hours": round(node_hours, 2),
        "false_suspicions": suspicions.count,
        "per_node_hour": round(suspicions.count / node_hours, 2),
        "wall_s": round(time.perf_counter() - started, 1),
    }


PARTS = ("spread", "churn", "suspicions", "links", "hostile", "partition", "floods")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--parts",
        default=",".join(PARTS[:-1]),
        help=f"some of {','.join(PARTS)} (floods takes 9 minutes here: ask for it)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    # Each simulated node's store keeps an SQLite index open: 10,000 nodes need more
    # descriptors than the usual soft limit of 1,024.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    figures: dict = {}
    console = Console(width=132)  # eleven columns: do not fold them into ellipses

    def ran(name: str, result: object) -> None:
        figures[name] = result
        print(json.dumps(result), file=sys.stderr, flush=True)

    if "spread" in parts:
        runs = []
        for n in [int(s) for s in args.sizes.split(",")]:
            for loss in (0.0, 0.01) if n <= 1000 else (0.0,):
                runs.append(spread(n, args.seed, loss))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        figures["runs"] = runs
        print_spread(console, runs)
        figures["ratios"] = {
            f"rounds_vs_log2n_{r['nodes']}": round(r["log2n"] / max(r["rounds_p99"], 1), 3)
            for r in runs
            if r["loss"] == 0.0
        }
    if "churn" in parts:
        ran("churn", churned := churn(1000, args.seed))
        console.print(
            f"10% churn at 1,000 nodes: {churned['churned']} crash as the ad is published and "
            f"restart 2 s later; reach after 10 s {churned['reach']} "
            f"({churned['advertise_frames_sent_per_node']} ADVERTISE sent per node), "
            "restarted nodes holding it "
            f"p50 {churned['restarted_seconds_p50']} s / p99 "
            f"{churned['restarted_seconds_p99']} s after restarting"
        )
    if "suspicions" in parts:
        ran("false_suspicions", suspected := false_suspicions(args.seed))
        console.print(
            f"false suspicions: {suspected['false_suspicions']} in {suspected['node_hours']} "
            f"node-hours of {SUSPICION_NODES} healthy nodes with 1% loss "
            f"({suspected['per_node_hour']} per node-hour; {suspected['wall_s']} s of wall time)"
        )
    if "links" in parts:
        ran("one_dead_link", links := [one_dead_link(args.seed, k) for k in (0, 3)])
        console.print(
            f"one dead link between two healthy nodes for {LINK_S:.0f} s: held suspect or "
            f"dead {links[0]['seconds_held_suspect_or_dead']} s without indirect probes, "
            f"{links[1]['seconds_held_suspect_or_dead']} s with 3 (PROBE/PROBE_ACK)"
        )
    if "hostile" in parts:
        ran("hostile", cheated := hostile(1000, args.seed))
        console.print(
            f"10% hostile at 1,000 nodes ({cheated['hostile']} withhold, eclipse, make up news "
            f"and advertise every chain at price 0): honest reach {cheated['reach']}, "
            f"p50 {cheated['seconds_p50']} s / p99 {cheated['seconds_p99']} s, "
            f"{cheated['advertise_frames_per_node']} frames of the honest ad per node "
            f"({cheated['all_advertise_frames_per_node']} ADVERTISE in all, lies included); "
            f"{cheated['buyers']} honest buyers: a first lookup lists an honest provider for "
            f"{cheated['first_lookup_lists_honest']}; bought in the first purchase (at most "
            f"{MAX_PROVIDERS} providers tried) {cheated['bought_in_first_purchase']}, within "
            f"two {cheated['bought_within_two_purchases']}, after p50 "
            f"{cheated['attempts_until_bought_p50']} / p99 "
            f"{cheated['attempts_until_bought_p99']} attempts; the purchase after that took "
            f"at most {cheated['attempts_in_the_purchase_after_max']}"
        )
    if "partition" in parts:
        ran("partition", split := partition(300, args.seed))
        console.print(
            f"a partition of 300 nodes into halves for {split['cut_s']:.0f} s: reach "
            f"{split['reach_during']} while cut, {split['reach_after']} 20 s after healing; "
            f"the other side holds it p50 {split['seconds_after_heal_p50']} s / p99 "
            f"{split['seconds_after_heal_p99']} s after"
        )
    if "floods" in parts:
        ran("floods", flooded := floods(1000, args.seed))
        console.print(
            f"floods at 1,000 nodes holding {flooded['held']:,} ads each: "
            f"{flooded['flooders']} flood within their limits and {flooded['rejoining']} "
            f"rejoin empty; an honest ad reaches {flooded['reach']} of honest nodes, p50 "
            f"{flooded['seconds_p50']} s / p99 {flooded['seconds_p99']} s; rejoined nodes hold "
            f"p50 {flooded['rejoined_hold_p50']:.3f} (min {flooded['rejoined_hold_min']:.3f}) "
            f"of the ads again; honest-honest bans {flooded['honest_honest_bans']}; "
            f"{flooded['wall_s']} s of wall time"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


def print_spread(console: Console, runs: list[dict]) -> None:
    table = Table(title="one advertisement through a simulated swarm (10 ms + exp(5 ms) links)")
    keys = (
        "nodes",
        "loss",
        "reach",
        "seconds_p50",
        "seconds_p99",
        "rounds_p50",
        "rounds_p99",
        "log2n",
        "advertise_frames_per_node",
        "advertise_bytes_per_node",
        "wall_s",
    )
    for column in (
        "nodes",
        "loss",
        "reach",
        "s p50",
        "s p99",
        "rounds p50",
        "rounds p99",
        "log2 N",
        "ADVERTISE/node",
        "bytes/node",
        "wall s",
    ):
        table.add_column(column, justify="right")
    for r in runs:
        table.add_row(*(str(r[k]) for k in keys))
    console.print(table)


if __name__ == "__main__":
    main()
