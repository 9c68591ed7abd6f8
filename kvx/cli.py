"""The `kvx` command: keys, namespaces and the ledger (the node and client verbs follow)."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvx.p2p import Bootstrap, NodeConfig, admin_call, load_node_config, run_node
from kvx.p2p._config import KEY_FILE, LEDGER_FILE
from kvx.protocol import ConfigError, KvxError, Namespace
from kvx.trust import Identity, Ledger, read_secret, write_private


def _keygen(args: argparse.Namespace, out: Console) -> None:
    identity = Identity.generate()
    identity.save(args.path)
    out.print(identity.node_id.hex())


def _id(args: argparse.Namespace, out: Console) -> None:
    out.print(Identity.load(args.path).node_id.hex())


def _namespace_create(args: argparse.Namespace, out: Console) -> None:
    secret = secrets.token_bytes(32)
    write_private(args.path, secret.hex() + "\n", "namespace secret")
    out.print(Namespace(secret).id.hex())
    print(
        f"created {args.path}; give its contents to each member over a private channel; "
        "they run `kvx namespace join PATH` with it on standard input",
        file=sys.stderr,
    )


def _namespace_join(args: argparse.Namespace, out: Console) -> None:
    text = sys.stdin.read().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != 32:
        raise ConfigError("standard input must hold the namespace secret: 64 hex digits")
    write_private(args.path, secret.hex() + "\n", "namespace secret")
    read_secret(Path(args.path))  # the same checks a node makes when it loads the file
    out.print(Namespace(secret).id.hex())


def _ledger(args: argparse.Namespace, out: Console) -> None:
    data = Path(args.data_dir)
    db = data / LEDGER_FILE
    if not db.exists():
        raise ConfigError(f"no ledger at {db}")
    me = Identity.load(data / KEY_FILE).node_id
    ledger = Ledger(db, me)
    try:
        ledger.verify()
        balances = Table(title="balances (micro-credits; positive: the peer owes this node)")
        balances.add_column("peer")
        balances.add_column("balance", justify="right")
        for peer, amount in sorted(ledger.balances().items(), key=lambda kv: -kv[1]):
            balances.add_row(peer.hex()[:16], f"{amount:,}")
        audit = Table(title="audit log")
        for column in ("time (UTC)", "role", "peer", "quote", "bytes", "price", "receipt"):
            audit.add_column(column, justify="right" if column in ("bytes", "price") else "left")
        for e in ledger.audit():
            when = datetime.fromtimestamp(e.when_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
            audit.add_row(
                when,
                e.role,
                e.peer.hex()[:16],
                e.quote_id.hex(),
                f"{e.bytes:,}",
                f"{e.price:,}",
                "yes" if e.receipted else "no",
            )
        out.print(balances)
        out.print(audit)
    finally:
        ledger.close()


def _node(args: argparse.Namespace, out: Console) -> None:
    if args.config:
        config = load_node_config(args.config)
    elif args.data_dir:
        config = NodeConfig(data_dir=Path(args.data_dir))
    else:
        raise ConfigError("kvx node needs --config FILE or --data-dir DIR")
    boots = tuple(Bootstrap.parse(b) for b in args.bootstrap)
    config = config.with_args(listen=args.listen, bootstrap=boots or None)
    run_node(config)


def _table(title: str, rows: list[dict], columns: list[str], out: Console) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    out.print(table)


def _status(args: argparse.Namespace, out: Console) -> None:
    s = admin_call(args.data_dir, "status")
    peers = ", ".join(f"{n} {state}" for state, n in s["peers"].items())
    table = Table(title="node status", show_header=False)
    for name, value in (
        ("node id", s["node_id"]),
        ("control", s["ctl"]),
        ("data", ", ".join(s["data"])),
        ("peers", peers),
        ("ads known", s["ads"]),
        ("payloads stored", s["stored"]),
        ("degraded", ", ".join(s["degraded"]) or "no"),
        ("internal errors", s["internal_errors"]),
        ("held for peers", ", ".join(f"{k} {v:,}" for k, v in s["held"].items())),
    ):
        table.add_row(name, str(value))
    out.print(table)


def _peers(args: argparse.Namespace, out: Console) -> None:
    rows = admin_call(args.data_dir, "peers")["peers"]
    for row in rows:
        row["node_id"] = row["node_id"][:16]
    _table("peers", rows, ["node_id", "ctl", "state", "inc", "score"], out)


def _ads(args: argparse.Namespace, out: Console) -> None:
    rows = admin_call(args.data_dir, "ads")["ads"]
    for row in rows:
        row["signer"], row["root"] = row["signer"][:16], row["root"][:16]
        row["ns"] = (row["ns"] or "public")[:16]
    _table("advertisements", rows, ["signer", "seq", "root", "blocks", "price", "ns"], out)


def _conformance(args: argparse.Namespace, out: Console) -> int:
    from kvx.conformance import dry_run, publish_fixture, report, run_live, run_vectors

    if args.dry_run:
        dry_run(out)
        return 0
    if args.publish_fixture:
        out.print(publish_fixture(args.publish_fixture).hex())
        return 0
    if args.vectors_only:
        if not args.adapter:
            raise ConfigError("--vectors-only needs --adapter COMMAND")
        results = run_vectors(args.adapter)
    else:
        if not (args.target and args.target_key):
            raise ConfigError("give --target tcp://HOST:PORT and --target-key PUBKEYHEX")
        try:
            key = bytes.fromhex(args.target_key)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError("--target-key is the target's Ed25519 public key, 64 hex digits")
        results = run_live(args.target, key, args.only or None)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"strict": args.strict, "cases": results}, indent=1) + "\n"
        )
    return report(results, args.strict, out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvx", description="A peer-to-peer exchange for KV caches.")
    sub = p.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="write a new node key file (mode 0600)")
    keygen.add_argument("path")
    keygen.set_defaults(run=_keygen)
    ident = sub.add_parser("id", help="print the node id of a key file")
    ident.add_argument("path")
    ident.set_defaults(run=_id)
    ns = sub.add_parser("namespace", help="private namespaces").add_subparsers(
        dest="action", required=True
    )
    create = ns.add_parser("create", help="make a new namespace secret file; prints its id")
    create.add_argument("path")
    create.set_defaults(run=_namespace_create)
    join = ns.add_parser("join", help="store a secret read from standard input; prints its id")
    join.add_argument("path")
    join.set_defaults(run=_namespace_join)
    ledger = sub.add_parser("ledger", help="balances and audit log of a node's ledger")
    ledger.add_argument("--data-dir", required=True)
    ledger.set_defaults(run=_ledger)
    node = sub.add_parser("node", help="run a node daemon in the foreground")
    node.add_argument("--config", help="a node.toml ([node], [policy], [[namespace]], [scores])")
    node.add_argument("--data-dir", help="without --config: run with defaults in DIR")
    node.add_argument("--listen", help="control address, tcp://HOST:PORT (PORT 0: any)")
    node.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        help="PUBKEYHEX@tcp://HOST:PORT or a peer's node.json (repeatable)",
    )
    node.set_defaults(run=_node)
    conf = sub.add_parser("conformance", help="test a node (or a codec) against the spec")
    conf.add_argument("--target", help="the node's control address, tcp://HOST:PORT")
    conf.add_argument("--target-key", help="the node's Ed25519 public key (hex)")
    conf.add_argument("--json", help="write every case's result to this file")
    conf.add_argument("--strict", action="store_true", help="SHOULD cases count too")
    conf.add_argument("--only", action="append", help="run only this case id (repeatable)")
    conf.add_argument("--dry-run", action="store_true", help="list the cases and stop")
    conf.add_argument(
        "--vectors-only",
        action="store_true",
        help="check a codec through --adapter instead of a live node",
    )
    conf.add_argument("--adapter", help="the adapter command (spec/README.md)")
    conf.add_argument(
        "--publish-fixture",
        metavar="DATA_DIR",
        help="load the conformance fixture into the kvx node in DATA_DIR",
    )
    conf.set_defaults(run=_conformance)
    for name, run, text in (
        ("status", _status, "a running node's state"),
        ("peers", _peers, "a running node's peer table"),
        ("ads", _ads, "the advertisements a running node knows"),
    ):
        verb = sub.add_parser(name, help=text)
        verb.add_argument("--data-dir", required=True)
        verb.set_defaults(run=run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = args.run(args, Console(soft_wrap=True))
    except KvxError as exc:
        print(f"kvx: error: {exc}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
