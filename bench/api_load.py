"""API load: a bounded load loop against `userllm serve` on loopback (a separate process, so the
load generator does not share the server's interpreter).

  reads   GET /v1/users/{id}/embedding and /recommendations, mixed 50/50, from --read-clients
          concurrent clients for --seconds, after an untimed warm-up pass: requests/s and
          latency p50/p99 (target on 2 cores: >= 1,000 req/s with p99 <= 20 ms)
  chat    streamed POST /v1/chat/completions at 1, 8 and 32 concurrent clients (--clients) for
          --seconds each: time to first token p50/p99 and tokens/s; and, in the same run, the
          same load on the engine called directly (AsyncEngine in this process, the same
          adapter and user tokens) while the server idles: the HTTP overhead ratio

Models: --adapter DIR (a trained adapter; its base model and encoder) or, by default, the tiny
random-weight models the service tests build (figures then measure the service, not a real
LLM). The store is a fresh SQLite one (or --database-url) with --users generated users.

    .venv/bin/python bench/api_load.py [--adapter DIR] [--seconds 20] [--clients 1,8,32]
    .venv/bin/python bench/api_load.py --smoke        # 1 s phases, nothing written

Writes bench/results/api_load.json (machine, config, results) and api_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "api"))  # build_tiny_models (the tests' tiny models)

QUESTION = [{"role": "user", "content": "What is my favourite movie genre?"}]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict, port: int, adapter: Path, threads: int, workers: int = 1) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--adapter", str(adapter),
           "--workers", str(workers)]
    proc = subprocess.Popen(cmd, env=env | {"USERLLM_THREADS": str(threads)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"api_load: the server did not start:\n{proc.stderr.read()[-2000:]}")
        time.sleep(0.2)


async def read_load(url: str, token: str, users: list[str], clients: int, seconds: float,
                    paths_of=None) -> dict:  # noqa: ANN001
    """`clients` keep-alive connections, each sending its next GET as soon as the last answer is
    in. The client is raw asyncio HTTP/1.1 (a request line, headers, a Content-Length body), not
    httpx: on 2 shared cores a heavier client would take the CPU the server is measured on."""
    host, port = url.removeprefix("http://").split(":")
    paths_of = paths_of or (lambda u, i: f"/v1/users/{u}/embedding" if i % 2
                            else f"/v1/users/{u}/recommendations?k=10")
    lat: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        i = w
        try:
            while time.monotonic() < stop:
                path = paths_of(users[i % len(users)], i)
                t0 = time.perf_counter()
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
                             f"Authorization: Bearer {token}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:-2])
                fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
                assert b"content-length" in fields, "the server sent no Content-Length"
                await reader.readexactly(int(fields[b"content-length"]))
                lat.append(time.perf_counter() - t0)
                errors += head[9:12] != b"200"
                i += clients
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(lat), "errors": errors,
            "req_per_s": len(lat) / wall, "p50_ms": pct(lat, 0.5) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3}


async def chat_http(url: str, token: str, users: list[str], clients: int, seconds: float,
                    max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=120)
    ttft: list[float] = []
    tokens = 0
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal tokens
        i = w
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model="userllm", messages=QUESTION, user=users[i % len(users)],
                max_tokens=max_tokens, stream=True, temperature=0.0)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    tokens += 1  # one content chunk per engine step and request
            if first is not None:
                ttft.append(first - t0)
            i += clients

    wall = await run_clients(worker, clients)
    await client.close()
    return chat_figures(clients, ttft, tokens, wall)


async def chat_direct(personalizer, tokens_of: dict, users: list[str], clients: int,
                      seconds: float, max_tokens: int) -> dict:  # noqa: ANN001
    from api.userops import chat_messages
    from llm.engine.async_engine import AsyncEngine
    from llm.engine.sampling_params import SamplingParams

    engine = AsyncEngine(personalizer.engine)
    ttft: list[float] = []
    tokens = 0
    stop = time.monotonic() + seconds
    prompt = chat_messages(QUESTION)

    async def worker(w: int) -> None:
        nonlocal tokens
        i = w
        while time.monotonic() < stop:
            u = users[i % len(users)]
            t0 = time.perf_counter()
            first = None
            # The server's per-request work before the engine: the user's (cached) tokens.
            ut = await asyncio.to_thread(tokens_of[u])
            async for out in engine.stream(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens), ut):
                if out.new_text:
                    first = first or time.perf_counter()
                    tokens += 1
            if first is not None:
                ttft.append(first - t0)
            i += clients

    wall = await run_clients(worker, clients)
    await engine.close()
    return chat_figures(clients, ttft, tokens, wall)


async def run_clients(worker, clients: int) -> float:  # noqa: ANN001
    """Run `clients` concurrent workers to their end; the wall seconds it took."""
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    return time.perf_counter() - t0


def chat_figures(clients: int, ttft: list[float], tokens: int, wall: float) -> dict:
    return {"clients": clients, "requests": len(ttft), "ttft_p50_ms": pct(ttft, 0.5) * 1e3,
            "ttft_p99_ms": pct(ttft, 0.99) * 1e3, "tokens_per_s": tokens / wall}


def cache_figures(url: str) -> dict:
    """User-token cache hit rate and refresh (miss) latency from the server's /metrics."""
    import httpx

    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(("userllm_user_token", "userllm_rank_state")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    hits = values.get('userllm_user_token_cache_total{result="hit"}', 0.0)
    misses = values.get('userllm_user_token_cache_total{result="miss"}', 0.0)
    n = values.get("userllm_user_tokens_refresh_seconds_count", 0.0)
    total = values.get("userllm_user_tokens_refresh_seconds_sum", 0.0)
    rank_hits = values.get('userllm_rank_state_cache_total{result="hit"}', 0.0)
    rank_misses = values.get('userllm_rank_state_cache_total{result="miss"}', 0.0)
    return {"rank_state_hits": rank_hits, "rank_state_misses": rank_misses,
            "token_cache_hits": hits, "token_cache_misses": misses,
            "token_cache_hit_rate": hits / (hits + misses) if hits + misses else float("nan"),
            "token_refresh_mean_ms": 1e3 * total / n if n else float("nan")}


def run(coro):  # noqa: ANN001, ANN201
    """The load generator's event loop: uvloop where installed (as the server's), for a lighter client."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def plot(results: dict, path: Path) -> None:
    """Reads: throughput and p99 by client count; chat: TTFT p50 over HTTP and direct."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    reads = results["reads"]
    a.plot([r["clients"] for r in reads], [r["req_per_s"] for r in reads], "o-", label="req/s")
    a.axhline(1000, ls="--", c="grey", lw=1)
    a.set_xlabel("read clients")
    a.set_ylabel("requests/s (dashed: target)")
    a2 = a.twinx()
    a2.plot([r["clients"] for r in reads], [r["p99_ms"] for r in reads], "s--", c="tab:red")
    a2.set_ylabel("p99 ms", color="tab:red")
    a.set_title("embedding + recommendation reads")
    for name, rows in (("HTTP (openai client)", results["chat_http"]), ("engine direct", results["chat_direct"])):
        b.plot([r["clients"] for r in rows], [r["ttft_p50_ms"] for r in rows], "o-", label=name)
    b.set_xscale("log", base=2)
    b.set_xlabel("chat clients")
    b.set_ylabel("time to first token p50 (ms)")
    b.legend()
    b.set_title("streamed chat")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=None, help="a trained adapter (default: tiny random models)")
    ap.add_argument("--database-url", default=None, help="data database URL (default: SQLite)")
    ap.add_argument("--keys-database-url", default=None)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of each load phase")
    ap.add_argument("--read-clients", default="4,8,16", help="concurrent read clients per phase")
    ap.add_argument("--clients", default="1,8,32", help="concurrent chat clients per phase")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="server torch threads (per worker: threads / workers)")
    ap.add_argument("--workers", type=int, default=1, help="server processes (userllm serve --workers)")
    ap.add_argument("--read-threads", type=int, default=None, help="server read pool threads per worker")
    ap.add_argument("--smoke", action="store_true", help="1 s phases, few users, nothing written")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.users, args.clients, args.read_clients = 1.0, 20, "1,4", "4"
    work = Path(tempfile.mkdtemp(prefix="api-load-"))
    home = work / "home"

    import torch

    torch.set_num_threads(1)  # the load generator; the server has its own process and threads
    from api.personalize import Personalizer
    from store import Store
    from store.admin import create_api_key
    from training.adapter_checkpoint import adapter_meta
    from training.data import write_sample_data
    from userenc.events import group_by_user
    from userenc.readers import read_jsonl

    if args.adapter:
        adapter, model_kind = Path(args.adapter), f"adapter {args.adapter}"
        adapter_meta(adapter)  # fails early on a folder that is no adapter
        histories = group_by_user(read_jsonl(write_sample_data(work / "events.jsonl", users=args.users)).events)
    else:
        from api_helpers import build_tiny_models

        tiny = build_tiny_models(work / "models")
        adapter, model_kind = tiny["adapter"], "tiny random-weight models (tests/api)"
        histories = group_by_user(read_jsonl(write_sample_data(work / "events.jsonl", users=args.users, items=40,
                                                                events_per_user=(10, 30), seed=3)).events)
    data_url = args.database_url or f"sqlite:///{home / 'store.db'}"
    keys_url = args.keys_database_url or f"sqlite:///{home / 'keys.db'}"
    with Store.open(home, data_url, keys_url, create=True) as store:
        store.ingest([e for h in histories.values() for e in h])
        token = create_api_key(store, ["generate", "embeddings:read"], label="api_load")
    users = sorted(histories)
    env = {k: v for k, v in os.environ.items() if not k.startswith("USERLLM_")}
    env.update(USERLLM_HOME=str(home), USERLLM_DATABASE_URL=data_url, USERLLM_KEYS_DATABASE_URL=keys_url,
               USERLLM_RATE_LIMIT="", USERLLM_RATE_LIMIT_PER_ADDRESS="", USERLLM_LOG_LEVEL="warning",
               PYTHONPATH=str(ROOT))
    if args.read_threads:
        env["USERLLM_READ_THREADS"] = str(args.read_threads)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    clients = [int(c) for c in args.clients.split(",")]
    results: dict = {"reads": None, "reads_by_route": {}, "chat_http": [], "chat_direct": []}
    proc = start_server(env, port, adapter, max(1, args.threads // args.workers), args.workers)
    try:
        import httpx

        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            for u in users:  # embeddings to read
                c.post(f"/v1/users/{u}/embedding:refresh").raise_for_status()
        # Warm-up, not timed: every worker computes its catalogue embeddings and every user's
        # latest state once (a cold recommendation runs the encoder: the cache counters count
        # those misses), so the read phases measure the steady state.
        run(read_load(url, token, users, 16, max(2.0, args.seconds / 4)))
        read_clients = [int(c) for c in args.read_clients.split(",")]
        results["reads"] = []
        for n in read_clients:
            r = run(read_load(url, token, users, n, args.seconds))
            results["reads"].append(r)
            print("reads", json.dumps(r), flush=True)
        for route in ("embedding", "recommendations?k=10"):
            r = run(read_load(url, token, users, read_clients[-1], args.seconds / 2,
                              lambda u, i, route=route: f"/v1/users/{u}/{route}"))
            results["reads_by_route"][route.split("?")[0]] = r
            print("reads", route, json.dumps(r), flush=True)
        for n in clients:
            r = run(chat_http(url, token, users, n, args.seconds, args.max_tokens))
            results["chat_http"].append(r)
            print("chat http", json.dumps(r), flush=True)
        results["server_metrics"] = cache_figures(url)
        print("server", json.dumps(results["server_metrics"]), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    # The engine called directly, in this process, with the server gone: the same adapter, the
    # same users' tokens (from the same sealed cache), the same load.
    torch.set_num_threads(args.threads)
    p = Personalizer.load(adapter, kv_cache_bytes=128 << 20, max_num_seqs=32)
    store = Store.open(home, data_url, keys_url)
    try:
        tokens_of = {u: (lambda u=u: p.cached_user_tokens(store, u)[0]) for u in users}
        for n in clients:
            r = run(chat_direct(p, tokens_of, users, n, args.seconds, args.max_tokens))
            results["chat_direct"].append(r)
            print("chat direct", json.dumps(r), flush=True)
    finally:
        store.close()
        p.close()

    rows = []
    for h, d in zip(results["chat_http"], results["chat_direct"]):
        rows.append([h["clients"], h["ttft_p50_ms"], h["ttft_p99_ms"], d["ttft_p50_ms"], d["ttft_p99_ms"],
                     h["tokens_per_s"], d["tokens_per_s"],
                     h["ttft_p50_ms"] / d["ttft_p50_ms"] if d["ttft_p50_ms"] else float("nan"),
                     d["tokens_per_s"] / h["tokens_per_s"] if h["tokens_per_s"] else float("nan")])
    from common import markdown_table, write_results  # noqa: E402 - bench/common.py

    sm = results["server_metrics"]
    md = (f"# API load ({model_kind}; {args.seconds:g} s per phase; server threads {args.threads}, "
          f"workers {args.workers})\n\n"
          "Reads, embedding and recommendations mixed 50/50 (target >= 1,000 req/s with p99 <= 20 ms "
          "on 2 cores; the load generator shares the 2 cores):\n\n"
          + markdown_table(["clients", "req/s", "p50 ms", "p99 ms", "errors"],
                           [[r["clients"], r["req_per_s"], r["p50_ms"], r["p99_ms"], r["errors"]]
                            for r in results["reads"]])
          + "\n"
          + "".join(f"- {name} alone ({r['clients']} clients): {r['req_per_s']:.0f} req/s, p50 "
                    f"{r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['errors']} errors\n"
                    for name, r in results["reads_by_route"].items())
          + f"- recommendations' latest-state cache: {sm['rank_state_hits']:.0f} hits, "
          f"{sm['rank_state_misses']:.0f} misses (a miss runs the encoder)\n\n"
          f"User-token cache over the chat phases: hit rate {sm['token_cache_hit_rate']:.3f} "
          f"({sm['token_cache_hits']:.0f} hits, {sm['token_cache_misses']:.0f} misses); "
          f"refresh (a miss) {sm['token_refresh_mean_ms']:.1f} ms mean\n\n"
          "Chat, streamed (HTTP through the openai client vs the engine called directly, same run):\n\n"
          + markdown_table(["clients", "TTFT p50 ms (HTTP)", "TTFT p99 ms (HTTP)", "TTFT p50 ms (direct)",
                            "TTFT p99 ms (direct)", "tokens/s (HTTP)", "tokens/s (direct)",
                            "TTFT overhead (HTTP/direct)", "throughput overhead (direct/HTTP)"], rows))
    config = {"model": model_kind, "users": len(users), "seconds": args.seconds, "read_clients": args.read_clients,
              "chat_clients": clients, "max_tokens": args.max_tokens, "server_threads": args.threads,
              "server_workers": args.workers, "read_threads": args.read_threads or "default",
              "database": "postgresql" if data_url.startswith("postgres") else "sqlite", "smoke": args.smoke}
    shutil.rmtree(work, ignore_errors=True)
    if args.smoke:
        print("smoke run: nothing written")
    elif args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "api_load.json").write_text(json.dumps({"config": config, "results": results}, indent=1))
        (out / "api_load.md").write_text(md)
        print(f"results in {out}")
    else:
        path = write_results("api_load", config, results, md)
        plot(results, path.with_suffix(".png"))
        print(f"wrote {path}")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
