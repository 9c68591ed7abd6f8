"""Policy: loading the TOML config (every mistake with its line) and applying it."""

import ipaddress
import re
from pathlib import Path

import pytest

from kvx.protocol import ConfigError, ErrorCode, Header, RemoteProtocolError, Withdraw
from kvx.trust import Identity, Policy, load_policy, open_envelope, seal, write_private

A = Identity.from_seed(b"\x0a" * 32).node_id
B = Identity.from_seed(b"\x0b" * 32).node_id
SECRET = "42" * 32


def write(tmp_path, text: str):
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_a_full_config(tmp_path):
    write_private(tmp_path / "team.ns", SECRET + "\n", "namespace secret")
    policy = load_policy(
        write(
            tmp_path,
            f"""
[policy]
allow = ["{A.hex()}", "{B.hex()}"]
deny = ["{B.hex()}"]
max_price = 5000
credit_limit = 100
encrypt_at_rest = true

[policy.peers.{A.hex()}]
credit_limit = 7

[[namespace]]
name = "team"
secret_file = "team.ns"
publish = ["{A.hex()}"]
buy = ["*"]

[scores]
threshold = -20
cooldown_s = 60
half_life_s = 600
""",
        )
    )
    assert policy.allow == {A, B} and policy.deny == {B}
    assert (policy.max_price, policy.credit_limit, policy.encrypt_at_rest) == (5000, 100, True)
    assert policy.credit_limit_for(A) == 7 and policy.credit_limit_for(B) == 100
    [rule] = policy.namespaces
    assert rule.name == "team" and rule.publishers == {A} and rule.buyers is None
    assert policy.namespace(rule.id) is rule
    assert policy.scores.threshold == -20.0


def test_an_empty_config_gives_the_defaults(tmp_path):
    policy = load_policy(write(tmp_path, ""))
    assert policy.allow is None and policy.namespaces == ()
    policy.check_peer(A)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("[policy]\nmax_price = = 3\n", 2, "Invalid"),  # TOML syntax, reported by tomllib
        ("[policy]\nmax_price = 1\nallow = ['nope']\n", 3, "not a node id"),
        ("[policy]\n\ncredit_limit = -5\n", 3, "must not be negative"),
        ("[policy]\nmax_pirce = 5\n", 2, "unknown key"),
        ("[policy]\nmax_price = '5'\n", 2, "expected int"),
        ("[scores]\nthreshold = 1\nhalf_life_s = 0\n", 3, "must be positive"),
        ("[policy.peers.abc]\ncredit_limit = 1\n", 1, "must be a node id"),
        ("[[namespace]]\nname = 'x'\n", 1, "needs secret_file"),
        ("[[namespace]]\nname = 'x'\nsecret_file = 'absent.ns'\n", 3, "cannot read"),
    ],
)
def test_malformed_configs_are_rejected_with_line_and_reason(tmp_path, text, line, words):
    with pytest.raises(ConfigError) as err:
        load_policy(write(tmp_path, text))
    message = str(err.value)
    assert f"line {line}" in message and words in message, message


def test_a_namespace_secret_others_can_read_is_refused(tmp_path):
    (tmp_path / "team.ns").write_text(SECRET)
    (tmp_path / "team.ns").chmod(0o644)
    with pytest.raises(ConfigError, match=r"line 3.*0644"):
        load_policy(write(tmp_path, "[[namespace]]\nname = 'team'\nsecret_file = 'team.ns'\n"))


def test_a_signed_statement_from_a_key_not_on_the_allow_list_is_denied(tmp_path):
    policy = load_policy(write(tmp_path, f'[policy]\nallow = ["{A.hex()}"]\n'))
    mallory = Identity.generate()
    st = open_envelope(seal(mallory, Withdraw(ad=1), Header(iat=1, exp=2, seq=1)))
    with pytest.raises(RemoteProtocolError) as err:
        policy.check_peer(st.signer_id)  # the signature is valid; the signer is not allowed
    assert err.value.code == ErrorCode.DENIED
    policy.check_peer(A)


def test_deny_wins_over_allow(tmp_path):
    policy = load_policy(
        write(tmp_path, f'[policy]\nallow = ["{A.hex()}"]\ndeny = ["{A.hex()}"]\n')
    )
    with pytest.raises(RemoteProtocolError) as err:
        policy.check_peer(A)
    assert err.value.code == ErrorCode.DENIED


def test_namespace_publish_and_buy_rules(tmp_path):
    write_private(tmp_path / "team.ns", SECRET, "namespace secret")
    policy = load_policy(
        write(
            tmp_path,
            f"""
[[namespace]]
name = "team"
secret_file = "team.ns"
publish = ["{A.hex()}"]
buy = ["{A.hex()}", "{B.hex()}"]
""",
        )
    )
    ns = policy.namespaces[0].id
    policy.check_namespace(A, ns, publish=True)
    policy.check_namespace(B, ns, publish=False)
    policy.check_namespace(B, None, publish=True)  # the public namespace
    with pytest.raises(RemoteProtocolError) as err:
        policy.check_namespace(B, ns, publish=True)
    assert err.value.code == ErrorCode.DENIED
    with pytest.raises(RemoteProtocolError) as err:
        policy.check_namespace(A, b"\x00" * 32, publish=False)
    assert err.value.code == ErrorCode.NOT_FOUND


def test_every_config_key_a_node_reads_is_documented():
    """docs/CONFIG.md names every key the loaders take, so none is known only to the code."""
    root = Path(__file__).parent.parent
    sources = (root / "p2p" / "_config.py").read_text() + (
        root / "trust" / "_policy.py"
    ).read_text()
    keys = set(re.findall(r'take\(\s*"(\w+)"', sources))
    keys |= set(re.findall(r'^    "(\w+)",$', sources, flags=re.MULTILINE))  # BUDGETS
    doc = (root / "docs" / "CONFIG.md").read_text()
    assert len(keys) > 30
    assert not [k for k in keys if f"`{k}`" not in doc]


@pytest.mark.parametrize("spelling", ["127.0.0.1", "::ffff:127.0.0.1", "::ffff:7f00:1"])
def test_a_loopback_address_is_refused_in_every_spelling(spelling):
    with pytest.raises(RemoteProtocolError) as refused:
        Policy(allow_loopback=False).check_address(ipaddress.ip_address(spelling))
    assert refused.value.code == ErrorCode.DENIED
