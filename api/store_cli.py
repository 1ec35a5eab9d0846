"""Store and admin subcommands: `ingest` and `admin create-key | delete-user | verify-deleted |
restore-check | rotate-kek | audit-verify | stale-models`.

Every command opens the store from the environment (USERLLM_HOME, USERLLM_DATABASE_URL,
USERLLM_KEYS_DATABASE_URL, USERLLM_KEK / USERLLM_KEK_FILE). Output names counts and keyed hashes,
never record contents. USERLLM_TEST_BATCH_DELAY (seconds, tests only) pauses inside each batch's
open transaction so the crash tests can kill a run mid-batch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _open():
    from store import Store

    return Store.open()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def cmd_ingest(args: argparse.Namespace) -> int:
    from userenc.readers import read_events

    result = read_events(args.data, args.format, skip_bad=args.skip_bad)  # MalformedInputError -> exit 2, nothing written
    if result.bad:
        where = ", ".join(f"{b.file}:{b.line}" for b in result.bad[:5])
        print(f"skipped {len(result.bad)} malformed lines ({where}{', ...' if len(result.bad) > 5 else ''})", file=sys.stderr)
    store = _open()
    total = len(result.events)

    def ack(c) -> None:  # noqa: ANN001 - printed only after the batch's commit
        print(f"batch {c.batches} committed: {c.inserted} new, {c.duplicates} already stored, {c.tombstoned} erased-user refused ({c.inserted + c.duplicates + c.tombstoned}/{total})", flush=True)

    counts = store.ingest(result.events, batch_size=args.batch_size, on_batch=ack if args.verbose else None)
    print(f"ingested {counts.inserted} new events ({counts.duplicates} already stored, {counts.tombstoned} of erased users refused, {len(result.bad)} malformed lines skipped) in {counts.batches} batches", flush=True)
    store.close()
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    from store.apikeys import create_key

    store = _open()
    token = create_key(store.data, [s.strip() for s in args.scopes.split(",") if s.strip()], args.label)
    store.audit("api-key.created", {"scopes": sorted(args.scopes.split(","))})
    print(token)
    print("store this key now: only its hash is kept", file=sys.stderr)
    return 0


def cmd_delete_user(args: argparse.Namespace) -> int:
    from store import delete_user

    store = _open()

    def progress(step: str, n: int) -> None:
        print(f"step {step}: {n}", flush=True)

    report = delete_user(store, args.external_id, batch_size=args.batch_size, on_progress=progress)
    if report.already_erased:
        print(f"already erased (keyed hash {report.uid_hash[:16]}…); nothing left to delete")
    else:
        print(f"erasure request {report.request_id} complete{' (resumed)' if report.resumed else ''}: deleted {report.deleted}")
    store.close()
    return 0


def cmd_verify_deleted(args: argparse.Namespace) -> int:
    from store import verify_deleted

    store = _open()
    clean, left, tombstone = verify_deleted(store, args.external_id)
    for name, n in left.items():
        print(f"{name:12s} {'clean' if n == 0 else f'{n} REMAINING'}")
    print(f"tombstone    {'present' if tombstone else 'absent'}")
    print("verified: nothing remains" if clean else "NOT DELETED: data remains", file=sys.stdout if clean else sys.stderr)
    store.close()
    return 0 if clean else 1


def cmd_restore_check(args: argparse.Namespace) -> int:
    from store import restore_check

    store = _open()
    counts = restore_check(store)
    print(f"tombstones {counts['tombstones']}: re-applied {counts['reapplied_data']} to the data database, {counts['reapplied_keys']} to the key store; cleaned {counts['users_cleaned']} users")
    store.close()
    return 0


def cmd_rotate_kek(args: argparse.Namespace) -> int:
    from privacy import KekDirectory

    store = _open()
    kek = store.keys.kek
    if isinstance(kek, KekDirectory) and not args.no_new_version:
        print(f"new KEK version {kek.new_version()} in {kek.path}")
    counts = store.keys.rewrap_all()
    in_use = store.keys.kek_versions_in_use()
    assert set(in_use) <= {kek.current_version()}, in_use
    store.audit("kek.rotated", {"to_version": kek.current_version(), **counts})
    print(f"rewrapped {counts['data_keys']} data keys and {counts['secrets']} secrets; all keys at KEK version {kek.current_version()}")
    if args.remove_old:
        if not isinstance(kek, KekDirectory):
            raise ValueError("--remove-old works on the key directory only; remove old versions from USERLLM_KEK/USERLLM_KEK_FILE yourself")
        for v in kek.versions()[:-1]:
            kek.remove_version(v)
            print(f"removed KEK version {v}")
    store.close()
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from sqlalchemy import func, select

    from store.models import AuditEntry

    store = _open()
    problems = store.audit_problems()
    with store.data.connect() as conn:
        n = conn.execute(select(func.count()).select_from(AuditEntry)).scalar_one()
    store.close()
    if problems:
        for p in problems:
            print(f"audit: {p}", file=sys.stderr)
        print(f"audit log FAILED verification ({len(problems)} problems in {n} entries)", file=sys.stderr)
        return 1
    print(f"audit log intact: {n} entries, chain and anchor verified")
    return 0


def cmd_stale_models(args: argparse.Namespace) -> int:
    from store import stale_models

    store = _open()
    runs = Path(args.runs) if args.runs else store.home / "runs"
    if not runs.is_dir():
        raise FileNotFoundError(f"no runs folder at {runs}")
    results = stale_models(store, runs)
    for r in results:
        detail = f"{r.erased_users} users erased since training" if r.status == "stale" else r.reason
        print(f"{r.status.upper():8s} {r.path}{'  ' + detail if detail else ''}")
    stale = sum(r.status == "stale" for r in results)
    print(f"{stale} stale of {len(results)} checkpoints", file=sys.stderr)
    store.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="read events from a file or folder into the encrypted store")
    p.add_argument("--data", required=True, help="input file (or the MovieLens folder)")
    p.add_argument("--format", required=True, choices=["movielens", "amazon", "jsonl", "csv"])
    p.add_argument("--skip-bad", action="store_true", help="count and skip malformed lines instead of refusing the input")
    p.add_argument("--batch-size", type=_positive, default=1000, help="events per transaction (default 1000)")
    p.add_argument("-v", "--verbose", action="store_true", help="print one line per committed batch")
    p.set_defaults(func=cmd_ingest)

    admin = sub.add_parser("admin", help="keys, erasure, audit").add_subparsers(dest="admin_command", metavar="ADMIN_COMMAND", required=True)
    a = admin.add_parser("create-key", help="create an API key (printed once)")
    a.add_argument("--scopes", default="read", help="comma-separated, e.g. read,write,admin")
    a.add_argument("--label", default="", help="a note for operators (no personal data)")
    a.set_defaults(func=cmd_create_key)
    a = admin.add_parser("delete-user", help="erase one user everywhere (resumable: re-run after a crash)")
    a.add_argument("external_id")
    a.add_argument("--batch-size", type=_positive, default=10_000, help="rows deleted per transaction")
    a.set_defaults(func=cmd_delete_user)
    a = admin.add_parser("verify-deleted", help="check every store, the FAISS index included; exit 1 if anything remains")
    a.add_argument("external_id")
    a.set_defaults(func=cmd_verify_deleted)
    a = admin.add_parser("restore-check", help="re-apply tombstones after a backup was restored")
    a.set_defaults(func=cmd_restore_check)
    a = admin.add_parser("rotate-kek", help="rewrap every data key under a new KEK version")
    a.add_argument("--no-new-version", action="store_true", help="do not mint a new version in the key directory; rewrap to the current one")
    a.add_argument("--remove-old", action="store_true", help="afterwards delete old KEK versions from the key directory")
    a.set_defaults(func=cmd_rotate_kek)
    a = admin.add_parser("audit-verify", help="check the audit log's hash chain; exit 1 if edited or cut")
    a.set_defaults(func=cmd_audit_verify)
    a = admin.add_parser("stale-models", help="list checkpoints trained on users erased since")
    a.add_argument("--runs", help="folder of checkpoints (default USERLLM_HOME/runs)")
    a.set_defaults(func=cmd_stale_models)
