"""Helpers for the service tests: tiny random-weight models (LLM, encoder, USER-LLM adapter)
built from generated data, and the environment of a `userllm` subprocess. (The server thread
is api/service/server.py.)"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "adapter"))  # make_tiny_chat_llm


def build_tiny_models(folder: Path) -> dict[str, Path]:
    """Generated events (24 users), a tiny chat LLM, a one-epoch encoder (K = 2 user tokens)
    and a one-epoch `proj` adapter over them: a few seconds on one core."""
    from adapter_helpers import make_tiny_chat_llm

    from training.config import AdapterConfig, AdapterTrainConfig, TrainConfig
    from training.data import write_sample_data
    from training.train_adapter import train_adapter
    from training.train_encoder import train_encoder
    from userenc.config import EncoderConfig
    from userenc.events import group_by_user
    from userenc.readers import read_jsonl
    from userenc.spec import load_spec

    events = write_sample_data(folder / "events.jsonl", users=24, items=40,
                               events_per_user=(10, 16), seed=3)
    histories = group_by_user(read_jsonl(events).events)
    llm = make_tiny_chat_llm(folder / "llm", layers=2, hidden=32)
    cfg = EncoderConfig(d_model=16, n_layers=1, n_heads=2, max_len=32, out_dim=8,
                        num_user_tokens=2, dropout=0.0)
    train_encoder(histories, load_spec("movielens").only(["item", "genres", "rating"]), cfg,
                  TrainConfig(epochs=1, batch_size=16), folder / "encoder", progress=False)
    train_adapter(histories, llm, folder / "encoder",
                  AdapterConfig(strategy="proj", cross_every_n=2, num_user_tokens=2,
                                tasks=["genre_history"]),
                  AdapterTrainConfig(epochs=1, per_user=1, lengths=[12], valid_examples=8),
                  folder / "adapter", progress=False)
    return {"events": events, "llm": llm, "encoder": folder / "encoder",
            "adapter": folder / "adapter", "histories": histories}


def subprocess_env(backend) -> dict[str, str]:  # noqa: ANN001
    """The environment of a `userllm` subprocess on the test's store (no other USERLLM_*)."""
    _, home, data_url, keys_url = backend
    env = {k: v for k, v in os.environ.items() if not k.startswith("USERLLM_")}
    env.update(USERLLM_HOME=str(home), USERLLM_DATABASE_URL=data_url,
               USERLLM_KEYS_DATABASE_URL=keys_url, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def fuzz(url: str, headers: dict[str, str], cases: int) -> tuple[dict[int, int], list[str]]:
    """schemathesis cases from the server's own OpenAPI spec, 70% valid and 30% schema-violating,
    against `url`: ({status: count}, descriptions of the 5xx answers)."""
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    # Every operation but revoking an API key: a generated id hits the fuzzer's own key soon
    # enough, and every later case would stop at 401 (test_api_edge covers revocation).
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json").json()).exclude(
        method="DELETE", path="/v1/admin/api-keys/{key_id}")
    seen: dict[int, int] = {}
    failures: list[str] = []

    def run(mode, n: int) -> None:  # noqa: ANN001
        @given(case=schema.as_strategy(generation_mode=mode))
        @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def one(case) -> None:  # noqa: ANN001
            r = case.call(base_url=url, headers=headers, timeout=60)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            if r.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {r.status_code} {r.text[:200]}")

        one()

    run(GenerationMode.POSITIVE, cases * 7 // 10)
    run(GenerationMode.NEGATIVE, cases - cases * 7 // 10)
    return seen, failures


SCOPES = ("events:write", "generate", "embeddings:read", "admin")


def make_keys(backend) -> dict[str, str]:  # noqa: ANN001
    """One API key per scope, and "all" with every scope but admin."""
    from store import Store
    from store.admin import create_api_key

    _, home, data_url, keys_url = backend
    with Store.open(home, data_url, keys_url) as store:
        keys = {s: create_api_key(store, [s]) for s in SCOPES}
        keys["all"] = create_api_key(store, ["events:write", "generate", "embeddings:read"])
    return keys


def settings_for(backend, **overrides):  # noqa: ANN001, ANN201
    from api.service import Settings

    _, home, data_url, keys_url = backend
    values = dict(home=home, database_url=data_url, keys_database_url=keys_url, threads=1,
                  kv_cache_mb=8, max_num_seqs=8, rate_limit="", rate_limit_per_address="",
                  request_timeout_s=60)
    return Settings(**(values | overrides))
