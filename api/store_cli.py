"""Store and admin subcommands: `ingest` and `admin init | create-key | list-keys | revoke-key |
delete-user | verify-deleted | restore-check | rotate-kek | audit-verify | stale-models`. Parsing and printing
only: the operations live in store/.

Every command opens the store from the environment (USERLLM_HOME, USERLLM_DATABASE_URL,
USERLLM_KEYS_DATABASE_URL, USERLLM_KEK / USERLLM_KEK_FILE); only `admin init` and `ingest` may
create one. Output names counts and keyed ids, never record contents or external ids (which is
also why delete-user and verify-deleted read ids from a file or stdin: argv shows in `ps`).
USERLLM_TEST_BATCH_DELAY (seconds, tests only) pauses inside each batch's open transaction so
the crash tests can kill a run mid-batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MAX_ID_CHARS = 256  # the store's limit (store.records.MAX_ID_CHARS)


def _open(create: bool = False):  # noqa: ANN202
    from store import Store

    return Store.open(create=create)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def read_ids(args: argparse.Namespace) -> list[str]:
    """External ids from the positional argument or --ids-from FILE|- (one per line), checked
    before anything changes. Messages name the line, never the id."""
    if (args.external_id is None) == (args.ids_from is None):
        raise ValueError(
            "give one external id, or --ids-from FILE (or - for stdin) with one id per line"
        )
    if args.external_id is not None:
        lines, where = [args.external_id], "the id"
    elif args.ids_from == "-":
        lines, where = sys.stdin.read().splitlines(), "stdin"
    else:
        lines, where = Path(args.ids_from).read_text(encoding="utf-8").splitlines(), args.ids_from
    ids = []
    for n, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        if len(text) > MAX_ID_CHARS:
            raise ValueError(f"{where}:{n}: id longer than {MAX_ID_CHARS} characters")
        ids.append(text)
    if not ids:
        raise ValueError(f"no ids in {where}")
    return list(dict.fromkeys(ids))


def cmd_ingest(args: argparse.Namespace) -> int:
    from userenc.readers import read_events

    result = read_events(
        args.data, args.format, skip_bad=args.skip_bad
    )  # MalformedInputError -> exit 2, nothing written
    if result.bad:
        where = ", ".join(f"{b.file}:{b.line}" for b in result.bad[:5])
        print(
            f"skipped {len(result.bad)} malformed lines ({where}{', ...' if len(result.bad) > 5 else ''})",
            file=sys.stderr,
        )
    total = len(result.events)

    def ack(c) -> None:  # noqa: ANN001 - printed only after the batch's commit
        done = c.inserted + c.duplicates + c.tombstoned
        print(
            f"batch {c.batches} committed: {c.inserted} new, {c.duplicates} already stored, {c.tombstoned} erased-user refused ({done}/{total})",
            flush=True,
        )

    with _open(
        create=True
    ) as store:  # the first ingest into an empty USERLLM_HOME creates the store
        counts = store.ingest(
            result.events, batch_size=args.batch_size, on_batch=ack if args.verbose else None
        )
    print(
        f"ingested {counts.inserted} new events ({counts.duplicates} already stored, {counts.tombstoned} of erased users refused, "
        f"{len(result.bad)} malformed lines skipped) in {counts.batches} batches",
        flush=True,
    )
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from store.admin import init_store

    store, created = init_store()
    with store:
        kek = store.keys.kek
        where = getattr(kek, "path", None) or getattr(kek, "source", "the configured KEK")
        if created:
            print(
                f"created a new store in {store.home} (KEK version {kek.current_version()} from {where}); back up keys.db and the KEK apart from store.db"
            )
        else:
            print(f"a store already exists in {store.home}; nothing changed")
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    from store.admin import create_api_key

    from api.service.settings import SCOPES

    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise ValueError(f"unknown scopes {unknown}: give some of {', '.join(SCOPES)}")
    with _open() as store:
        token = create_api_key(store, scopes, args.label)
    print(token)
    print("store this key now: only its hash is kept", file=sys.stderr)
    return 0


def cmd_list_keys(args: argparse.Namespace) -> int:
    from store.apikeys import list_keys

    with _open() as store:
        for k in list_keys(store.data):
            state = "revoked" if k["revoked_at"] is not None else "live"
            print(f"{k['id']}\t{state}\t{','.join(k['scopes'])}\t{k['label']}")
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    from store.admin import revoke_api_key

    with _open() as store:
        if not revoke_api_key(store, args.id):
            raise ValueError(f"no live API key has id {args.id} (see `userllm admin list-keys`)")
    print(f"revoked API key {args.id}; a running server stops accepting it within its key cache time")
    return 0


def cmd_delete_user(args: argparse.Namespace) -> int:
    from store import delete_user
    from store.erasure import authenticate

    ids = read_ids(args)

    def progress(step: str, n: int) -> None:
        print(f"step {step}: {n}", flush=True)

    with _open() as store:
        for n, ext in enumerate(ids, start=1):  # all resolved before the first erasure
            if authenticate(store, store.hasher.user(ext)) is None:
                raise ValueError(
                    f"unknown user (id {n} of {len(ids)}): no record for this external id in any store; nothing was erased"
                )
        for ext in ids:
            report = delete_user(
                store, ext, batch_size=args.batch_size, on_progress=progress, compact=args.compact
            )
            tag = f"keyed id {report.uid_hash[:16]}…"
            if report.already_erased:
                print(f"{tag}: already erased; nothing left to delete")
            else:
                print(
                    f"{tag}: erasure request {report.request_id} complete{' (resumed)' if report.resumed else ''}: deleted {report.deleted}"
                )
            for note in report.notes:
                print(f"{tag}: note: {note}", file=sys.stderr)
    return 0


def cmd_verify_deleted(args: argparse.Namespace) -> int:
    from store import verify_deleted

    ids, failed = read_ids(args), 0
    with _open() as store:
        for ext in ids:
            v = verify_deleted(store, ext)
            tag = f"keyed id {store.hasher.user(ext)[:16]}…"
            if len(ids) == 1:
                for name, n in v.remaining.items():
                    print(f"{name:12s} {'clean' if n == 0 else f'{n} REMAINING'}")
                print(f"tombstone    {'present' if v.tombstone else 'absent'}")
            if v.clean:
                print(f"{tag}: verified: nothing remains")
            else:
                failed += 1
                why = (
                    "no erasure record for this id (never stored, or the key store was altered)"
                    if not v.known
                    else "NOT DELETED: data remains"
                )
                print(f"{tag}: {why}", file=sys.stderr)
    return 1 if failed else 0


def cmd_restore_check(args: argparse.Namespace) -> int:
    from store import restore_check

    with _open() as store:
        r = restore_check(store)
    print(
        f"tombstones {r.tombstones}: re-applied {r.reapplied_data} to the data database, {r.reapplied_keys} to the key store; "
        f"cleaned {r.users_cleaned} users"
    )
    if r.forged_tombstones:
        print(
            f"warning: {r.forged_tombstones} tombstone copies in the data database do not authenticate and were ignored",
            file=sys.stderr,
        )
    for gap in r.audit_gaps:
        print(
            f"audit: {gap} (acknowledged in the log; anchors moved to the current end)",
            file=sys.stderr,
        )
    if r.exposed_users:
        print(
            f"warning: {r.exposed_users} erased users' keys were wrapped under KEK versions {r.exposed_kek_versions}, which still exist: "
            "a key-store backup from before their erasure opens their data; run `userllm admin rotate-kek --remove-old`",
            file=sys.stderr,
        )
    for note in r.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_rotate_kek(args: argparse.Namespace) -> int:
    from store.admin import rotate_kek

    def progress(done: int) -> None:
        print(f"rewrapped {done} data keys so far", flush=True)

    with _open() as store:
        r = rotate_kek(
            store,
            mint=not args.no_new_version,
            remove_old=args.remove_old,
            on_batch=progress if args.verbose else None,
        )
    if r.minted:
        print(f"new KEK version {r.to_version}")
    if r.resumed:
        print(f"resumed an interrupted rotation to KEK version {r.to_version}")
    print(
        f"rewrapped {r.data_keys} data keys and {r.secrets} secrets; all keys at KEK version {r.to_version}"
    )
    for v in r.removed_versions:
        print(f"removed KEK version {v}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    with _open() as store:
        report = store.audit_report()
    for note in report.notes:
        print(f"audit: note: {note}")
    if report.problems:
        for p in report.problems:
            print(f"audit: {p}", file=sys.stderr)
        print(
            f"audit log FAILED verification ({len(report.problems)} problems in {report.entries} entries)",
            file=sys.stderr,
        )
        return 1
    print(f"audit log intact: {report.entries} entries, chain and anchors verified")
    return 0


def cmd_stale_models(args: argparse.Namespace) -> int:
    from store import stale_models

    with _open() as store:
        runs = Path(args.runs) if args.runs else store.home / "runs"
        if not runs.is_dir():
            raise FileNotFoundError(f"no runs folder at {runs}")
        results = stale_models(store, runs)
    for r in results:
        detail = (
            f"{r.erased_users} users erased since training" if r.status == "stale" else r.reason
        )
        print(f"{r.status.upper():8s} {r.path}{'  ' + detail if detail else ''}")
    stale = sum(r.status == "stale" for r in results)
    print(f"{stale} stale of {len(results)} checkpoints", file=sys.stderr)
    return 0


def _ids_args(a: argparse.ArgumentParser) -> None:
    a.add_argument(
        "external_id",
        nargs="?",
        help="one external id (prefer --ids-from: argv shows in `ps` and shell history)",
    )
    a.add_argument(
        "--ids-from", metavar="FILE", help="read external ids from FILE, one per line (- for stdin)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="read events from a file or folder into the encrypted store (creates it in an empty USERLLM_HOME)",
    )
    p.add_argument("--data", required=True, help="input file (or the MovieLens folder)")
    p.add_argument("--format", required=True, choices=["movielens", "amazon", "jsonl", "csv"])
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="count and skip malformed lines instead of refusing the input",
    )
    p.add_argument(
        "--batch-size", type=_positive, default=1000, help="events per transaction (default 1000)"
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="print one line per committed batch"
    )
    p.set_defaults(func=cmd_ingest)

    admin = sub.add_parser("admin", help="store creation, keys, erasure, audit").add_subparsers(
        dest="admin_command", metavar="ADMIN_COMMAND", required=True
    )
    a = admin.add_parser(
        "init", help="create a new store (databases, key store, KEK) in USERLLM_HOME"
    )
    a.set_defaults(func=cmd_init)
    a = admin.add_parser("create-key", help="create an API key (printed once)")
    a.add_argument(
        "--scopes",
        required=True,
        help="comma-separated service scopes: events:write, generate, embeddings:read, admin",
    )
    a.add_argument("--label", default="", help="a note for operators (no personal data)")
    a.set_defaults(func=cmd_create_key)
    a = admin.add_parser("list-keys", help="API keys: id, live or revoked, scopes, label")
    a.set_defaults(func=cmd_list_keys)
    a = admin.add_parser("revoke-key", help="revoke an API key by its id (see list-keys)")
    a.add_argument("--id", type=_positive, required=True, help="the key's id from list-keys")
    a.set_defaults(func=cmd_revoke_key)
    a = admin.add_parser(
        "delete-user", help="erase users everywhere (resumable: re-run after a crash)"
    )
    _ids_args(a)
    a.add_argument(
        "--batch-size", type=_positive, default=10_000, help="rows deleted per transaction"
    )
    a.add_argument(
        "--compact",
        action="store_true",
        help="PostgreSQL: also rewrite the data tables (VACUUM FULL; locks them) so no erased bytes stay in free page space",
    )
    a.set_defaults(func=cmd_delete_user)
    a = admin.add_parser(
        "verify-deleted",
        help="check every store, the FAISS index included; exit 1 if anything remains",
    )
    _ids_args(a)
    a.set_defaults(func=cmd_verify_deleted)
    a = admin.add_parser(
        "restore-check",
        help="after restoring a backup: re-apply erasures, report audit gaps and exposed KEK versions",
    )
    a.set_defaults(func=cmd_restore_check)
    a = admin.add_parser(
        "rotate-kek",
        help="rewrap every data key under a new KEK version (resumes an interrupted rotation)",
    )
    a.add_argument(
        "--no-new-version",
        action="store_true",
        help="do not mint a new version in the key directory; rewrap to the current one",
    )
    a.add_argument(
        "--remove-old",
        action="store_true",
        help="afterwards delete old KEK versions from the key directory",
    )
    a.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print a line per committed batch of rewrapped keys",
    )
    a.set_defaults(func=cmd_rotate_kek)
    a = admin.add_parser(
        "audit-verify",
        help="check the audit log's hash chain and anchors; exit 1 if edited, cut or rolled back",
    )
    a.set_defaults(func=cmd_audit_verify)
    a = admin.add_parser("stale-models", help="list checkpoints trained on users erased since")
    a.add_argument("--runs", help="folder of checkpoints (default USERLLM_HOME/runs)")
    a.set_defaults(func=cmd_stale_models)
