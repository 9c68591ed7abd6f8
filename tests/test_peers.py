"""The membership table: suspicion before death, rejoin by incarnation, bounds."""

import random

from kvx.p2p._peers import PeerTable, State
from kvx.protocol import PeerEntry

A, B, C, ME = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32, b"\x00" * 32


def table(**kw) -> PeerTable:
    settings = {"suspect_after_s": 2, "dead_after_s": 5, "max_peers": 3, "rng": random.Random(0)}
    return PeerTable(ME, **{**settings, **kw})


def test_an_unanswered_probe_makes_a_peer_suspect_then_dead_and_silence_does_not():
    t = table()
    assert t.heard_from(A, "tcp://a", 1, now=0)
    assert t.tick(100) == ([], [])  # silent, but never asked: nothing to suspect
    assert [p.key for p in t.to_probe(1, now=100)] == [A]
    assert t.tick(101) == ([], [])
    suspect, dead = t.tick(102.5)
    assert [p.key for p in suspect] == [A] and dead == []
    t.alive_again(A, 103)  # any message refutes suspicion
    assert t.get(A).state == State.ALIVE
    t.to_probe(1, now=104)
    t.tick(106.5)
    suspect, dead = t.tick(109.5)
    assert [p.key for p in dead] == [A]


def test_an_unanswered_probe_is_retried_before_suspicion():
    t = table(max_peers=8)
    for key in (A, B, C):
        t.heard_from(key, "tcp://x", 1, now=0)
    t.to_probe(1, now=1)  # A (ties broken by the table's order)
    t.to_probe(2, now=1.5)  # B and C
    t.alive_again(B, 1.6)
    t.alive_again(C, 1.6)
    assert [p.key for p in t.to_probe(1, now=2.2)] == [A]  # 1.2 s unanswered: retry
    t.alive_again(A, 2.3)  # the retry's answer: never suspect
    assert t.tick(4) == ([], []) and t.get(A).state == State.ALIVE


def probed_and_silent(t: PeerTable, key: bytes, now: float) -> None:
    """`key` is probed at `now` and never answers."""
    t.get(key).last_probed = -1.0
    assert key in {p.key for p in t.to_probe(len(t.all()), now)}


def test_a_dead_peer_that_speaks_again_is_alive_and_a_restart_is_noticed():
    t = table()
    t.heard_from(A, "tcp://a", 1, now=0)
    probed_and_silent(t, A, 0)
    t.tick(3)
    t.tick(6)
    assert t.get(A).state == State.DEAD
    assert t.alive_again(A, 7)  # a healed partition: its own statement proves it lives
    assert t.get(A).state == State.ALIVE
    assert not t.heard_from(A, "tcp://a", 1, now=8)  # same incarnation: nothing new
    assert t.heard_from(A, "tcp://a2", 2, now=9)  # restarted, at a new address
    assert (t.get(A).state, t.get(A).ctl) == (State.ALIVE, "tcp://a2")


def test_the_table_is_bounded_and_dead_peers_make_room_first():
    kept = {A, B, C}
    t = table(keep=lambda key: key in kept)
    for key in (A, B, C):
        t.heard_from(key, "tcp://x", 1, now=0)
    assert not t.heard_from(b"\x0d" * 32, "tcp://d", 1, now=0)  # all kept: no room
    probed_and_silent(t, C, 15)
    t.alive_again(A, 20)
    t.alive_again(B, 20)
    t.tick(20)  # C died
    t.tick(30)
    assert t.heard_from(b"\x0d" * 32, "tcp://d", 1, now=31)
    assert C not in t and len(t.all()) == 3


def test_strangers_filling_the_table_cannot_keep_a_newcomer_out():
    t = table(max_peers=64)
    sybils = [bytes([1, i]) + bytes(30) for i in range(64)]
    for i, key in enumerate(sybils):
        assert t.heard_from(key, "tcp://127.0.0.1:1", 1, now=i / 100)
    honest = b"\x0e" * 32
    assert t.heard_from(honest, "tcp://127.0.0.1:2", 1, now=1.0)  # a young stranger leaves
    assert honest in t and len(t.all()) == 64 and t.evicted == 1
    # The elder half is never evicted for a newcomer, and evictions are rate-limited.
    assert all(key in t for key in sybils[:32])
    assert not t.heard_from(b"\x0f" * 32, "tcp://127.0.0.1:3", 1, now=1.5)
    assert t.heard_from(b"\x0f" * 32, "tcp://127.0.0.1:3", 1, now=2.1)


def test_candidates_are_a_quarter_of_the_table_one_per_address_and_die_unprobed():
    t = table(max_peers=8)
    named = [PeerEntry(bytes([9, i]) + bytes(30), "tcp://127.0.0.1:9", 1, 0) for i in range(8)]
    assert len(t.learn(named)) == 1  # one name per address
    spread = [
        PeerEntry(bytes([8, i]) + bytes(30), f"tcp://127.0.0.1:{i + 1}", 1, 0) for i in range(8)
    ]
    added = [t.add_candidate(p, now=0) for p in t.learn(spread)]
    assert added.count(True) == 2  # max_peers // 4
    t.tick(10)  # they never answered: forgotten, not kept as dead peers to probe
    assert t.all() == [] and t.to_probe(4, now=11) == []
    t.heard_from(A, "tcp://127.0.0.1:5", 1, now=12)
    (twin,) = t.learn([PeerEntry(B, "tcp://127.0.0.1:5", 1, 0)])
    assert not t.add_candidate(twin, now=12)  # A is at that address already


def test_probes_go_to_the_longest_unprobed_and_one_dead_peer_a_round():
    t = table()
    for key in (A, B, C):
        t.heard_from(key, "tcp://x", 1, now=0)
    probed_and_silent(t, C, 0)
    t.alive_again(A, 3)
    t.alive_again(B, 3)
    t.tick(4)
    t.tick(6)  # C is dead
    first = {p.key for p in t.to_probe(1, now=7)}
    for key in first - {C}:
        t.alive_again(key, 7.5)  # it answered: no retry owed
    second = {p.key for p in t.to_probe(1, now=8)}
    assert C in first and C in second  # one dead peer a round, to notice a healed link
    assert (first | second) - {C} == {A, B}


def test_peer_exchange_learns_only_new_live_peers_and_never_itself():
    t = table()
    t.heard_from(A, "tcp://a", 1, now=0)
    learned = t.learn(
        [
            PeerEntry(A, "tcp://a", 1, 0),
            PeerEntry(ME, "tcp://me", 1, 0),
            PeerEntry(B, "tcp://b", 1, 2),
            PeerEntry(C, "tcp://c", 1, 0),
        ]
    )
    assert [p.key for p in learned] == [C]
    assert not t.heard_from(ME, "tcp://me", 1, now=0)
