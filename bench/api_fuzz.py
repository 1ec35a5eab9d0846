"""API fuzzing, the long run: schemathesis cases generated from the service's OpenAPI spec (70%
valid, 30% schema-violating) against a real server on loopback with the tests' tiny models and
a small store, counting answers by status; any 5xx is a failure (the CI test runs 1,000 cases).

    .venv/bin/python bench/api_fuzz.py [--cases 20000] [--smoke]

Writes bench/results/api_fuzz.json (machine, config, results) and api_fuzz.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "api"))  # build_tiny_models, fuzz (shared with the test)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20_000)
    ap.add_argument("--smoke", action="store_true", help="100 cases, nothing written")
    args = ap.parse_args()
    if args.smoke:
        args.cases = 100

    import httpx
    import torch

    torch.set_num_threads(1)
    from api_helpers import build_tiny_models, fuzz

    from api.service import Settings, create_app
    from api.service.server import ServerThread
    from store import Store
    from store.admin import create_api_key

    work = Path(tempfile.mkdtemp(prefix="api-fuzz-"))
    try:
        tiny = build_tiny_models(work / "models")
        home = work / "home"
        urls = (f"sqlite:///{home / 'store.db'}", f"sqlite:///{home / 'keys.db'}")
        with Store.open(home, *urls, create=True) as store:
            token = create_api_key(store, ["events:write", "generate", "embeddings:read", "admin"])
        settings = Settings(home=home, database_url=urls[0], keys_database_url=urls[1], threads=1,
                            adapter=tiny["adapter"], max_tokens=4, kv_cache_mb=8, max_k=20,
                            max_events_per_request=100, rate_limit="", rate_limit_per_address="")
        auth = {"Authorization": f"Bearer {token}"}
        with ServerThread(create_app(settings)) as server:
            h = tiny["histories"]
            events = [{"event_id": e.event_id, "user_id": e.user_id, "item_id": e.item_id,
                       "timestamp": e.timestamp, "fields": e.fields} for u in sorted(h)[:3] for e in h[u]]
            httpx.post(f"{server.url}/v1/events", json={"events": events}, headers=auth).raise_for_status()
            t0 = time.perf_counter()
            seen, failures = fuzz(server.url, auth, args.cases)
            seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(seen.values())
    results = {"cases": total, "seconds": seconds, "by_status": {str(k): v for k, v in sorted(seen.items())},
               "server_errors": len(failures), "first_failures": failures[:20]}
    from common import markdown_table, write_results

    md = (f"# API fuzzing ({total} schemathesis cases in {seconds:.0f} s; tiny models, SQLite)\n\n"
          f"**{len(failures)} server errors (5xx)**\n\n"
          + markdown_table(["status", "answers"], [[k, v] for k, v in sorted(seen.items())]))
    print(md)
    for f in failures[:20]:
        print(f)
    if not args.smoke:
        print(f"wrote {write_results('api_fuzz', {'cases': args.cases}, results, md)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
