"""Private-namespace membership: challenge, proof, and every way a proof can be wrong."""

import pytest

from kvx.protocol import ErrorCode, Membership, Namespace, NamespaceProof, RemoteProtocolError
from kvx.trust import Identity, Memberships, NamespaceRule, Policy

ALICE = Identity.from_seed(b"\x0a" * 32).node_id
BOB = Identity.from_seed(b"\x0b" * 32).node_id
EVE = Identity.from_seed(b"\x0e" * 32).node_id
TEAM = Namespace(b"\x42" * 32)
OTHER = Namespace(b"\x43" * 32)


def node(me: bytes, *spaces: Namespace) -> Memberships:
    rules = tuple(NamespaceRule(name=f"ns{i}", namespace=s) for i, s in enumerate(spaces))
    return Memberships(me, Policy(namespaces=rules), ttl_s=100)


def code(fn, *args) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as err:
        fn(*args)
    return err.value.code


def test_a_member_proves_itself_and_may_then_ask():
    bob, alice = node(BOB, TEAM), node(ALICE, TEAM)
    challenge = bob.challenge(ALICE, now=0)
    assert bob.accept(ALICE, alice.prove(BOB, challenge), now=1) == {TEAM.id}
    bob.require(ALICE, TEAM.id, now=2)
    bob.require(ALICE, None, now=2)  # the public namespace needs no proof


def test_a_request_without_a_proof_is_not_a_member():
    bob = node(BOB, TEAM)
    assert code(bob.require, ALICE, TEAM.id, 0) == ErrorCode.NOT_A_MEMBER
    bob.challenge(ALICE, now=0)
    assert code(bob.require, ALICE, TEAM.id, 0) == ErrorCode.NOT_A_MEMBER


def test_a_proof_made_with_the_wrong_secret_fails():
    bob, eve = node(BOB, TEAM), node(EVE, OTHER)
    challenge = bob.challenge(EVE, now=0)
    forged = Membership(challenge, (NamespaceProof(TEAM.id, OTHER.proof(EVE, BOB, challenge)),))
    assert code(bob.accept, EVE, forged, 1) == ErrorCode.NOT_A_MEMBER
    # Proofs for namespaces Bob is not in are ignored, not trusted.
    assert bob.accept(EVE, eve.prove(BOB, challenge), now=1) == frozenset()
    assert code(bob.require, EVE, TEAM.id, 1) == ErrorCode.NOT_A_MEMBER


def test_a_proof_is_bound_to_both_node_ids():
    bob, alice = node(BOB, TEAM), node(ALICE, TEAM)
    # Eve relays a proof Alice made for Bob as her own: it names Alice as the prover.
    challenge = bob.challenge(EVE, now=0)
    assert code(bob.accept, EVE, alice.prove(BOB, challenge), 1) == ErrorCode.NOT_A_MEMBER
    # A proof Alice made for Eve is worth nothing to Bob.
    challenge = bob.challenge(ALICE, now=0)
    assert code(bob.accept, ALICE, alice.prove(EVE, challenge), 1) == ErrorCode.NOT_A_MEMBER


def test_a_proof_is_bound_to_the_session():
    bob, alice = node(BOB, TEAM), node(ALICE, TEAM)
    old = bob.challenge(ALICE, now=0)
    stale = alice.prove(BOB, old)
    assert bob.challenge(ALICE, now=1) == old  # heartbeats keep the session's challenge
    bob.forget(ALICE)  # the connection closed: the session is over
    assert bob.challenge(ALICE, now=1) != old
    assert code(bob.accept, ALICE, stale, 2) == ErrorCode.NOT_A_MEMBER
    fresh = alice.prove(BOB, bob.challenge(ALICE, now=3))
    bob.accept(ALICE, fresh, now=4)
    bob.forget(ALICE)  # disconnect ends the session
    assert code(bob.require, ALICE, TEAM.id, 5) == ErrorCode.NOT_A_MEMBER


def test_sessions_expire():
    bob, alice = node(BOB, TEAM), node(ALICE, TEAM)
    bob.accept(ALICE, alice.prove(BOB, bob.challenge(ALICE, now=0)), now=1)
    bob.require(ALICE, TEAM.id, now=100)
    assert code(bob.require, ALICE, TEAM.id, 101) == ErrorCode.NOT_A_MEMBER


def test_a_node_in_no_namespace_has_nothing_to_prove():
    assert code(node(ALICE).prove, BOB, b"\x00" * 16) == ErrorCode.NOT_FOUND
