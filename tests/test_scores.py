"""Peer scores: events, decay, bans with a cooling period, persistence."""

import pytest

from kvx.protocol import ErrorCode
from kvx.trust import Event, PeerScores, ScoreRules

P = b"\x01" * 32
Q = b"\x02" * 32
RULES = ScoreRules(threshold=-50, cooldown_s=100, half_life_s=10)


@pytest.fixture
def scores(tmp_path):
    s = PeerScores(tmp_path / "scores.db", RULES)
    yield s
    s.close()


def test_faults_lower_and_deliveries_raise(scores):
    assert scores.record(P, Event.BAD_SIGNATURE, now=0) == -20
    assert scores.record(P, Event.GOOD_DELIVERY, now=0) == -15
    assert scores.score(Q, now=0) == 0


def test_scores_halve_over_the_half_life(scores):
    scores.record(P, Event.BAD_CHUNK, now=0)
    assert scores.score(P, now=10) == pytest.approx(-15)
    assert scores.score(P, now=30) == pytest.approx(-3.75)


def test_falling_below_the_threshold_bans_for_the_cooldown(scores):
    scores.record(P, Event.BAD_CHUNK, now=0)
    assert not scores.is_banned(P, now=0)
    scores.record(P, Event.BAD_CHUNK, now=0)  # -60 < -50
    assert scores.is_banned(P, now=0) and scores.is_banned(P, now=99)
    assert not scores.is_banned(P, now=101)
    assert not scores.is_banned(Q, now=0)


def test_scores_and_bans_survive_a_restart(tmp_path):
    first = PeerScores(tmp_path / "s.db", RULES)
    first.record(P, Event.BAD_CHUNK, now=0)
    first.record(P, Event.BAD_CHUNK, now=0)
    first.close()
    second = PeerScores(tmp_path / "s.db", RULES)
    assert second.score(P, now=0) == -60 and second.is_banned(P, now=50)
    assert second.table(now=0) == [(P, -60, True)]
    second.close()


def test_error_codes_map_to_events():
    assert Event.for_code(ErrorCode.BAD_SIGNATURE) is Event.BAD_SIGNATURE
    assert Event.for_code(ErrorCode.REPLAYED) is Event.REPLAY
    assert Event.for_code(ErrorCode.CHUNK_HASH_MISMATCH) is Event.BAD_CHUNK
    assert Event.for_code(ErrorCode.NOT_FOUND) is None  # not a fault of the peer
