"""The `kvx` command: keys, namespaces and the ledger (the node and client verbs follow)."""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvx import __version__
from kvx.p2p import Bootstrap, NodeConfig, admin_call, load_node_config, run_node
from kvx.p2p._config import KEY_FILE, LEDGER_FILE
from kvx.p2p._dialcheck import KEY_HINT, Probe, check_public_key, probe
from kvx.p2p._logs import LEVELS, setup_logging
from kvx.protocol import ConfigError, KvxError, Namespace
from kvx.trust import Identity, Ledger, read_secret, write_private


def _keys(identity: Identity, args: argparse.Namespace, out: Console) -> None:
    """Both names of a node, labelled: mixing them up is the commonest first mistake."""
    public, node = identity.public_key.hex(), identity.node_id.hex()
    if args.json:
        print(json.dumps({"public_key": public, "node_id": node}))
        return
    out.print(f"public key  {public}  (--bootstrap KEY@tcp://HOST:PORT and --target-key)")
    out.print(f"node id     {node}  (how peers, ads and ledgers name the node)")


def _key_path(path: str) -> Path:
    """A path ending in .key is a key file; any other is a data dir, whose node uses
    DATA_DIR/node.key."""
    p = Path(path)
    return p if p.suffix == ".key" else p / KEY_FILE


def _keygen(args: argparse.Namespace, out: Console) -> None:
    identity = Identity.generate()
    path = _key_path(args.path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    identity.save(path)
    print(f"wrote {path}", file=sys.stderr)
    _keys(identity, args, out)


def _id(args: argparse.Namespace, out: Console) -> None:
    if (args.path is None) == (args.data_dir is None):
        raise ConfigError("kvx id takes a data dir (or key file) or --data-dir DIR, one of them")
    path = _key_path(args.path or args.data_dir)
    if not path.exists():
        raise ConfigError(
            f"no key file at {path} (a node makes DATA_DIR/{KEY_FILE} on first start)"
        )
    _keys(Identity.load(path), args, out)


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
        balances = sorted(ledger.balances().items(), key=lambda kv: -kv[1])
        audit = ledger.audit()
    finally:
        ledger.close()
    if args.json:
        entries = [
            {
                "when_ms": e.when_ms,
                "role": e.role,
                "peer": e.peer.hex(),
                "quote": e.quote_id.hex(),
                "bytes": e.bytes,
                "price": e.price,
                "receipted": e.receipted,
            }
            for e in audit
        ]
        print(json.dumps({"balances": {p.hex(): a for p, a in balances}, "audit": entries}))
        return
    cut = _cut(args)
    table = Table(title="balances (micro-credits; positive: the peer owes this node)")
    table.add_column("peer")
    table.add_column("balance", justify="right")
    for peer, amount in balances:
        table.add_row(cut(peer.hex()), f"{amount:,}")
    log = Table(title="audit log")
    for column in ("time (UTC)", "role", "peer", "quote", "bytes", "price", "receipt"):
        log.add_column(column, justify="right" if column in ("bytes", "price") else "left")
    for e in audit:
        when = datetime.fromtimestamp(e.when_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        log.add_row(
            when,
            e.role,
            cut(e.peer.hex()),
            e.quote_id.hex(),
            f"{e.bytes:,}",
            f"{e.price:,}",
            "yes" if e.receipted else "no",
        )
    out.print(table)
    out.print(log)


def _node(args: argparse.Namespace, out: Console) -> None:
    if args.config:
        config = load_node_config(args.config)
    elif args.data_dir:
        config = NodeConfig(data_dir=Path(args.data_dir))
    else:
        raise ConfigError("kvx node needs --config FILE or --data-dir DIR")
    boots = tuple(Bootstrap.parse(b) for b in args.bootstrap)
    config = config.with_args(
        listen=args.listen,
        data_host=args.data_host,
        advertise=args.advertise,
        bootstrap=boots or None,
    )
    setup_logging(args.log_level)
    for boot in config.bootstrap:  # a wrong key would otherwise fail silently, forever
        found = probe(boot.ctl, boot.key)
        where = f"bootstrap {boot.key.hex()[:16]}…@{boot.ctl}"
        if found is Probe.WRONG_KEY:
            raise ConfigError(f"{where}: {found.value}; {KEY_HINT}")
        if found is not Probe.ANSWERS:  # a JSON line like every other record of the node
            logging.getLogger("kvx.node").warning(
                {
                    "event": "bootstrap_unanswered",
                    "key": boot.key.hex(),
                    "ctl": boot.ctl,
                    "why": f"{found.value}; the node keeps trying",
                }
            )
    run_node(config, _judges(config))


def _judges(config: NodeConfig) -> dict:
    """The models a node judges fraud proofs with, by fingerprint (`judge_models`)."""
    if not config.judge_models:
        return {}
    try:
        from kvx.integrations import hf
        from kvx.integrations.verify import judge
    except ImportError:
        raise ConfigError("judge_models needs the hf extra (pip install 'kvx[hf]')") from None
    judges = {}
    for path in config.judge_models:
        loaded = hf.load_model(path, block=config.judge_block)
        judges[loaded.fp.digest()] = lambda bound, model=loaded.model: judge(model, bound)
    return judges


def _cut(args: argparse.Namespace):
    """Ids in full with --full, else their first 16 hex digits (enough to tell apart)."""
    return (lambda text: text) if args.full else (lambda text: text[:16] if text else text)


def _table(title: str, rows: list[dict], columns: list[str], out: Console) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    out.print(table)


def _status(args: argparse.Namespace, out: Console) -> None:
    s = admin_call(args.data_dir, "status")
    if args.json:
        print(json.dumps(s))
        return
    peers = ", ".join(f"{n} {state}" for state, n in s["peers"].items())
    table = Table(title="node status", show_header=False)
    for name, value in (
        ("node id", _cut(args)(s["node_id"])),
        ("public key", _cut(args)(s["public_key"])),
        ("control", s["ctl"]),
        ("data", ", ".join(s["data"])),
        ("peers", peers),
        ("ads known", s["ads"]),
        ("payloads stored", s["stored"]),
        ("degraded", ", ".join(s["degraded"]) or "no"),
        ("internal errors", s["internal_errors"]),
        ("budgets (used / limit)", _budgets(s["budgets"])),
        ("held for peers", ", ".join(f"{k} {v:,}" for k, v in s["held"].items())),
    ):
        table.add_row(name, str(value))
    out.print(table)


def _savings(args: argparse.Namespace, out: Console) -> None:
    s = admin_call(args.data_dir, "savings")
    if args.json:
        print(json.dumps(s))
        return
    rate = s["prefill_flops_per_second"]
    saved = (
        f"{s['prefill_seconds_saved']:,.1f} s (at {rate / 1e9:,.1f} GFLOP/s, as this node's"
        " clients measured their own prefills)"
        if rate
        else "not yet priced: no client of this node has measured a prefill"
    )
    table = Table(title="savings since the node started", show_header=False)
    for name, value in (
        ("sold", f"{s['sold_tokens']:,} tokens, {s['sold_bytes']:,} bytes streamed"),
        ("earned", f"{s['credits_earned'] / 1e6:,.6f} credits"),
        ("bought", f"{s['bought_tokens']:,} tokens, {s['bought_bytes']:,} bytes"),
        ("spent", f"{s['credits_spent'] / 1e6:,.6f} credits"),
        ("prefill bought", f"{s['prefill_flops_saved'] / 1e12:,.3f} TFLOP"),
        ("prefill time saved", saved),
    ):
        table.add_row(name, value)
    out.print(table)


def _budgets(budgets: dict[str, dict[str, int]]) -> str:
    def size(name: str, n: int) -> str:
        return _size(n) if name.endswith("_bytes") else f"{n:,}"

    return "\n".join(
        f"{name} {size(name, b['used'])} / {size(name, b['limit'])}"
        f" ({100 * b['used'] / b['limit']:.0f}%)"
        for name, b in budgets.items()
    )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,} B"


def _model_source(path: str | None) -> Any:
    """A model loaded by the 'hf' extra: the file or directory given, else SmolLM2."""
    from kvx.integrations import hf

    return hf.load_model(path) if path else hf.load_smollm2()


def _model_export(args: argparse.Namespace, out: Console) -> None:
    from kvx.integrations import hf

    made = hf.export_model_dir(_model_source(args.source), args.out)
    out.print(f"wrote {made}: a model directory vLLM and `kvx.integrations.hf` load")


def _model_info(args: argparse.Namespace, out: Console) -> None:
    loaded = _model_source(args.path)
    layout = loaded.fp.layout
    per_token = layout.block_bytes // layout.block
    info = {
        "model_id": loaded.fp.model_id,
        "fingerprint": loaded.fp.digest().hex(),
        "dtype": layout.dtype,
        "layers": layout.layers,
        "kv_heads": layout.kv_heads,
        "head_dim": layout.head_dim,
        "block_tokens": layout.block,
        "kv_bytes_per_token": per_token,
        "kv_bytes_per_4096_tokens": 4096 * per_token,
    }
    if args.json:
        print(json.dumps(info))
        return
    table = Table(title="model", show_header=False)
    for key, value in info.items():
        table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else value)
    out.print(table)


def _peers(args: argparse.Namespace, out: Console) -> None:
    rows = admin_call(args.data_dir, "peers")["peers"]
    if args.json:
        print(json.dumps(rows))
        return
    cut = _cut(args)
    for row in rows:
        row["node_id"] = cut(row["node_id"])
    for row in rows:
        kind, _, proof = row["verdict"].rpartition(" ")
        row["verdict"] = f"{kind} {cut(proof)}" if proof else ""
    _table("peers", rows, ["node_id", "ctl", "state", "inc", "score", "verdict"], out)


def _ads(args: argparse.Namespace, out: Console) -> None:
    rows = admin_call(args.data_dir, "ads")["ads"]
    if args.json:
        print(json.dumps(rows))
        return
    cut = _cut(args)
    for row in rows:
        row["signer"], row["root"] = cut(row["signer"]), cut(row["root"])
        row["ns"] = cut(row["ns"] or "public")
    _table("advertisements", rows, ["signer", "seq", "root", "blocks", "price", "ns"], out)


def _conformance(args: argparse.Namespace, out: Console) -> int:
    from kvx.conformance import dry_run, report, run_live, run_vectors

    if args.dry_run:
        dry_run(out)
        return 0
    if args.publish_fixture:
        for root in _publish_fixture(args.publish_fixture):
            out.print(root.hex())
        return 0
    if args.vectors_only:
        if not args.adapter:
            raise ConfigError("--vectors-only needs --adapter COMMAND")
        results = run_vectors(args.adapter)
    else:
        if not (args.target and args.target_key):
            raise ConfigError("give --target tcp://HOST:PORT and --target-key PUBKEYHEX")
        key = check_public_key(args.target_key, "--target-key")
        found = probe(args.target, key)
        if found is not Probe.ANSWERS:
            hint = f"; {KEY_HINT}" if found is Probe.WRONG_KEY else ""
            raise ConfigError(f"--target {args.target}: {found.value}{hint}")
        results = run_live(args.target, key, args.only or None)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"strict": args.strict, "cases": results}, indent=1) + "\n"
        )
    return report(results, args.strict, out)


def _publish_fixture(data_dir: str) -> list[bytes]:
    """Load the conformance fixtures (spec/README.md) into the kvx node serving
    `data_dir`, through its admin API as any local publisher would; their content roots."""
    from kvx.conformance import FIXTURE_CHUNK, FIXTURES

    return [
        admin_call(
            data_dir,
            "publish",
            fp=fp,
            layout=layout.__dict__,
            blocks=chain,
            payload=payload,
            chunk=FIXTURE_CHUNK,
            params=params,
        )["root"]
        for fp, layout, chain, payload, params in FIXTURES
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvx", description="A peer-to-peer exchange for KV caches.")
    sub = p.add_subparsers(dest="command", required=True)
    p.add_argument("--version", action="version", version=f"kvx {__version__}")
    p.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    keygen = sub.add_parser(
        "keygen", help="write a new node key (a DATA_DIR, or a file path), mode 0600"
    )
    keygen.add_argument("path", help="the data dir a node will run in, or a path ending in .key")
    keygen.add_argument("--json", action="store_true", help="print the keys as JSON")
    keygen.set_defaults(run=_keygen)
    ident = sub.add_parser("id", help="print the public key and node id of a node")
    ident.add_argument("path", nargs="?", help="the node's data dir, or a path ending in .key")
    ident.add_argument("--data-dir", help="the node's data dir, as other commands take it")
    ident.add_argument("--json", action="store_true", help="print the keys as JSON")
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
    model = sub.add_parser("model", help="models, with the 'hf' extra").add_subparsers(
        dest="action", required=True
    )
    export = model.add_parser(
        "export", help="write a model directory (safetensors) from a GGUF, as vLLM needs"
    )
    export.add_argument("out", help="the directory to make")
    export.add_argument(
        "--from",
        dest="source",
        help="a .gguf file or model directory (default: the demo's SmolLM2-135M-Instruct)",
    )
    export.set_defaults(run=_model_export)
    info = model.add_parser("info", help="a model's KV layout, fingerprint and bytes per token")
    info.add_argument("path", nargs="?", help="a .gguf file or model directory (default: SmolLM2)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_model_info)
    node = sub.add_parser("node", help="run a node daemon in the foreground")
    node.add_argument("--config", help="a node.toml ([node], [policy], [[namespace]], [scores])")
    node.add_argument("--data-dir", help="without --config: run with defaults in DIR")
    node.add_argument(
        "--listen", help="control address to bind, tcp://IP:PORT (IP 0.0.0.0: all; PORT 0: any)"
    )
    node.add_argument("--data-host", help="IP to bind the data port on (0.0.0.0: all)")
    node.add_argument(
        "--advertise",
        metavar="IP",
        help="the IP peers dial, when it is not the bound one (a wildcard bind, NAT, a container)",
    )
    node.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        help="PUBKEYHEX@tcp://HOST:PORT or a peer's node.json (repeatable)",
    )
    node.add_argument("--log-level", choices=LEVELS, default="info", help="default: info")
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
        ("ledger", _ledger, "balances and audit log of a node's ledger"),
        ("savings", _savings, "what a running node sold and its clients bought, and saved"),
    ):
        verb = sub.add_parser(name, help=text)
        verb.add_argument("--data-dir", required=True)
        verb.add_argument("--json", action="store_true", help="print JSON, ids in full")
        verb.add_argument("--full", action="store_true", help="print ids in full")
        verb.set_defaults(run=run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Every mistake a user can make ends in one line on stderr and a non-zero exit;
    --verbose adds the traceback."""
    args = parser().parse_args(argv)
    try:
        wide = getattr(args, "full", False)  # full ids are never folded into a column
        code = args.run(args, Console(soft_wrap=True, width=1000 if wide else None))
    except (KvxError, OSError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"kvx: error: {_one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, KvxError) else 1
    except KeyboardInterrupt:
        return 130
    return code or 0


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
