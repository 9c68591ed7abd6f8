"""A user's mistakes with the `kvx` command: each is one line on stderr, a non-zero exit,
no traceback (unless --verbose), and a hint where the fix is not obvious."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nacl.exceptions import RuntimeError as NaclRuntimeError
from swarm import NodeProcess, eventually

from kvx.cli import main
from kvx.p2p import admin_call
from kvx.trust import Identity, curve_public_key

KVX = Path(sys.executable).with_name("kvx")
HINT = "give the node's public key, not its node id"


def kvx(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(KVX), *args], capture_output=True, text=True, timeout=timeout)


def one_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvx: error: "), result.stderr
    for text in expected:
        assert text in lines[0]
    return lines[0]


def identity_whose_node_id_is_a_curve_point() -> Identity:
    """A node id that also decodes as an Ed25519 key (about 1 in 12), so that only the
    handshake can tell it is not the node's public key."""
    while True:
        identity = Identity.generate()
        try:
            curve_public_key(identity.node_id)
        except NaclRuntimeError:
            continue
        return identity


def not_a_curve_point() -> Identity:
    while True:
        identity = Identity.generate()
        try:
            curve_public_key(identity.node_id)
        except NaclRuntimeError:
            return identity


@pytest.fixture
def running(tmp_path):
    node = NodeProcess(tmp_path / "a").start()
    node.wait_ready()
    yield node
    node.stop()


def test_a_port_in_use(tmp_path, running):
    result = kvx("node", "--data-dir", str(tmp_path / "b"), "--listen", running.info["ctl"])
    one_line(result, f"cannot listen on {running.info['ctl']}: Address already in use")
    assert "stopped" not in result.stderr  # it never started


def test_a_listen_address_without_its_scheme(tmp_path):
    result = kvx("node", "--data-dir", str(tmp_path / "b"), "--listen", "127.0.0.1:7005")
    one_line(result, "listen '127.0.0.1:7005': expected tcp://IP:PORT")


def test_a_data_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("")
    result = kvx("node", "--data-dir", str(tmp_path / "file" / "node"))
    one_line(result, "cannot create --data-dir", "Not a directory")


def test_verbose_adds_the_traceback(tmp_path):
    result = kvx("--verbose", "node", "--data-dir", str(tmp_path / "b"), "--listen", "x")
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("kvx: error: listen 'x': expected")


def test_version():
    result = kvx("--version")
    assert result.returncode == 0 and result.stdout.startswith("kvx 0.")


def test_status_without_a_node_or_after_it_died(tmp_path, running):
    one_line(kvx("status", "--data-dir", str(tmp_path / "none")), "no node is running in")
    running.proc.send_signal(signal.SIGKILL)
    running.proc.wait()
    one_line(kvx("status", "--data-dir", str(running.dir)), "is gone")


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root")
def test_status_as_another_user(running):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes `nobody`, then runs the command's code (loaded)
        sys.stderr = open(write, "w")  # noqa: SIM115 (the child ends with os._exit)
        os.setgid(65534)
        os.setuid(65534)
        code = main(["status", "--data-dir", str(running.dir)])
        sys.stderr.flush()
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        stderr = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) != 0
    assert stderr.splitlines() == [
        f"kvx: error: cannot read {running.dir.resolve() / 'node.json'}: permission denied "
        "(run this as the user that runs the node)"
    ]


def test_bootstrap_with_a_node_id_that_is_no_key(tmp_path, running):
    wrong = not_a_curve_point().node_id.hex()
    result = kvx(
        "node", "--data-dir", str(tmp_path / "b"), "--bootstrap", f"{wrong}@tcp://127.0.0.1:9"
    )
    one_line(result, "is not an Ed25519 public key", HINT)


def test_bootstrap_with_the_node_id_of_a_running_node(tmp_path):
    identity = identity_whose_node_id_is_a_curve_point()
    (tmp_path / "a").mkdir(mode=0o700)
    identity.save(tmp_path / "a" / "node.key")
    node = NodeProcess(tmp_path / "a").start()
    try:
        ctl = node.wait_ready()["ctl"]
        boot = f"{identity.node_id.hex()}@{ctl}"
        result = kvx("node", "--data-dir", str(tmp_path / "b"), "--bootstrap", boot)
        one_line(result, "refused the handshake", HINT)
    finally:
        node.stop()


def test_conformance_against_a_node_id_or_a_closed_port(running):
    ctl = running.info["ctl"]
    wrong = not_a_curve_point().node_id.hex()
    one_line(kvx("conformance", "--target", ctl, "--target-key", wrong), HINT)
    key = running.info["public_key"]
    closed = "tcp://127.0.0.1:9"
    one_line(kvx("conformance", "--target", closed, "--target-key", key), "nothing listens there")


def test_conformance_against_the_wrong_node(tmp_path, running):
    other = Identity.generate().public_key.hex()  # a valid key, of some other node
    result = kvx("conformance", "--target", running.info["ctl"], "--target-key", other)
    one_line(result, "refused the handshake", HINT)


def test_json_and_full_ids(running):
    status = json.loads(kvx("status", "--data-dir", str(running.dir), "--json").stdout)
    assert status["node_id"] == running.info["node_id"]
    assert status["public_key"] == running.info["public_key"]
    short = kvx("status", "--data-dir", str(running.dir)).stdout
    full = kvx("status", "--data-dir", str(running.dir), "--full").stdout
    assert running.info["node_id"][:16] in short and running.info["node_id"] not in short
    assert running.info["node_id"] in full and running.info["public_key"] in full
    for verb in ("peers", "ads"):
        result = kvx(verb, "--data-dir", str(running.dir), "--json")
        assert result.returncode == 0 and isinstance(json.loads(result.stdout), list)
    ledger = json.loads(kvx("ledger", "--data-dir", str(running.dir), "--json").stdout)
    assert ledger == {"balances": {}, "audit": []}


def test_log_lines_carry_a_level_and_log_level_filters_them(tmp_path):
    def run(level: str | None) -> list[dict]:
        data = tmp_path / (level or "default")
        extra = ["--log-level", level] if level else []
        proc = subprocess.Popen(
            [str(KVX), "node", "--data-dir", str(data), *extra],
            stderr=subprocess.PIPE,
            text=True,
        )
        eventually(lambda: (data / "node.json").exists(), 30)
        admin_call(data, "status")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0
        return [json.loads(line) for line in stderr.splitlines()]

    default = run(None)
    assert [e["event"] for e in default] == ["ready", "leaving", "stopped"]
    assert {e["level"] for e in default} == {"info"}
    assert run("warning") == []


def test_a_bootstrap_peer_that_does_not_answer_is_a_json_warning(tmp_path):
    """The node starts anyway and keeps trying; the warning is a log record like any
    other, so a program reading the log as JSON lines does not trip over it."""
    key = Identity.generate().public_key.hex()
    data = tmp_path / "b"
    proc = subprocess.Popen(
        [str(KVX), "node", "--data-dir", str(data), "--bootstrap", f"{key}@tcp://127.0.0.1:9"],
        stderr=subprocess.PIPE,
        text=True,
    )
    eventually(lambda: (data / "node.json").exists(), 30)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.splitlines()]
    assert lines[0]["event"] == "bootstrap_unanswered" and lines[0]["level"] == "warning"
    assert lines[0]["key"] == key and lines[0]["ctl"] == "tcp://127.0.0.1:9"
    assert "nothing listens there" in lines[0]["why"]
    assert [e["event"] for e in lines[1:]] == ["ready", "leaving", "stopped"]


def test_id_takes_data_dir_as_every_other_command(running):
    by_flag = kvx("id", "--data-dir", str(running.dir))
    assert by_flag.returncode == 0 and running.info["public_key"] in by_flag.stdout
    assert by_flag.stdout == kvx("id", str(running.dir)).stdout
    one_line(kvx("id"), "kvx id takes a data dir")


def test_a_misspelt_table_is_named_not_the_key_it_left_missing(tmp_path):
    conf = tmp_path / "node.toml"
    conf.write_text('[nodes]\ndata_dir = "."\n')
    one_line(kvx("node", "--config", str(conf)), "line 1: nodes: unknown table")


def test_sizes_are_written_as_people_write_them(tmp_path):
    from kvx.p2p._config import load_node_config

    conf = tmp_path / "node.toml"
    conf.write_text(
        '[node]\ndata_dir = "."\ndisk_bytes = "2GiB"\npayment_window_bytes = "64 MiB"\n'
    )
    config = load_node_config(conf)
    assert (config.disk_bytes, config.payment_window_bytes) == (2 << 30, 64 << 20)
    conf.write_text('[node]\ndata_dir = "."\nmemory_bytes = "lots"\n')
    one_line(kvx("node", "--config", str(conf)), "node.memory_bytes: 'lots' is no size")


def test_status_counters_are_whole_numbers(running):
    running.call("status")  # a message or two counted
    status = json.loads(kvx("status", "--data-dir", str(running.dir), "--json").stdout)
    counters = [*status["sent"].values(), *status["received"].values(), status["internal_errors"]]
    assert counters and all(type(n) is int for n in counters)


def test_status_shows_each_budget_beside_its_limit(running):
    budgets = running.call("status")["budgets"]
    assert budgets["store_disk_bytes"] == {"used": 0, "limit": 16 << 30}
    assert budgets["ads"]["limit"] == 100_000 and budgets["peers"]["limit"] == 64
    shown = kvx("status", "--data-dir", str(running.dir)).stdout
    assert "store_disk_bytes 0 B / 16.0 GiB (0%)" in shown
