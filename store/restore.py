"""restore-check: reconcile the store after a backup of either database was restored.

Re-applies every tombstone known to either database (each verified by its MAC), removes what
the backup brought back for those users, reports any gap in the audit chain (and records the
acknowledgement in the log, so the gap stays on record while the anchors move on), and warns
while a KEK version that wrapped an erased user's key still exists: a key-store backup from
before that erasure opens the user's data until `rotate-kek --remove-old` destroys the version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from store.erasure import _run_step
from store.erasure_steps import STEPS, data_tombstones, remaining, write_data_tombstone
from store.store import Store


@dataclass(slots=True)
class RestoreReport:
    tombstones: int = 0
    reapplied_keys: int = 0
    reapplied_data: int = 0
    users_cleaned: int = 0
    forged_tombstones: int = 0
    audit_gaps: list[str] = field(default_factory=list)
    exposed_kek_versions: list[int] = field(
        default_factory=list
    )  # wrapped erased users' keys, still present
    exposed_users: int = 0
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            k: getattr(self, k)
            for k in (
                "tombstones",
                "reapplied_keys",
                "reapplied_data",
                "users_cleaned",
                "forged_tombstones",
                "exposed_users",
            )
        }


def restore_check(store: Store) -> RestoreReport:
    data_tombs, forged = data_tombstones(store)
    key_tombs = store.keys.tombstones()
    report = RestoreReport(
        tombstones=len(set(data_tombs) | set(key_tombs)), forged_tombstones=forged
    )
    for h in sorted(set(data_tombs) | set(key_tombs)):
        t = key_tombs.get(h) or data_tombs[h]
        report.reapplied_keys += store.keys.put_tombstone(t)
        report.reapplied_data += write_data_tombstone(store, t)
        if any(remaining(store, h, t.user_id).values()):
            for step in STEPS[1:]:
                _run_step(store, step, h, t.user_id, t.kek_version, 10_000, None)
            report.users_cleaned += 1
    if report.users_cleaned:
        report.notes = store.compact_after_erasure()
    present = set(store.keys.kek.versions())
    exposed = [t for t in store.keys.tombstones().values() if t.kek_version in present]
    report.exposed_users = len(exposed)
    report.exposed_kek_versions = sorted({t.kek_version for t in exposed})
    report.audit_gaps = store.audit("restore-check", report.counts(), acknowledge_gaps=True)
    return report
