"""The `kvx` command: keys, namespaces and the ledger (the node and client verbs follow)."""

from __future__ import annotations

import argparse
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvx.protocol import ConfigError, KvxError, Namespace
from kvx.trust import Identity, Ledger, read_secret, write_private

KEY_FILE = "node.key"
LEDGER_FILE = "ledger.db"


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args, Console(soft_wrap=True))
    except KvxError as exc:
        print(f"kvx: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
