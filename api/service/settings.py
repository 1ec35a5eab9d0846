"""Service settings: `USERLLM_*` environment variables, or a TOML file (`userllm serve --config`),
the environment winning over the file. Nothing here opens anything."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

SCOPES = ("events:write", "generate", "embeddings:read", "admin")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="USERLLM_", extra="forbid")

    # The store: USERLLM_HOME, USERLLM_DATABASE_URL, USERLLM_KEYS_DATABASE_URL; the KEK comes
    # from USERLLM_KEK / USERLLM_KEK_FILE or USERLLM_HOME/kek, as for every command.
    home: Path | None = None
    database_url: str | None = None
    keys_database_url: str | None = None
    # Models: the adapter (chat and generate; its base model and encoder unless given); the
    # encoder checkpoint for embeddings and recommendations: with an adapter, its own encoder
    # (give `encoder` only where that checkpoint moved: its weights are checked), without one,
    # any encoder checkpoint. `model` alone serves the base model, unpersonalized.
    adapter: Path | None = None
    model: Path | None = None
    encoder: Path | None = None
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    kv_cache_mb: int = Field(default=128, ge=1)
    max_num_seqs: int = Field(default=32, ge=1)
    # Threads for the user routes' store and encoder work (embedding, recommendations, similar,
    # events): one per core, at most 8. The work holds the GIL most of the time, so more threads
    # only queue behind each other: on 2 cores, 8 threads gave a p99 of 25-38 ms where 2 gave
    # 18 ms at the same load (bench/api_load.py --read-threads).
    read_threads: int = Field(default_factory=lambda: min(8, os.cpu_count() or 1), ge=1)
    # Server processes (uvicorn workers). Each loads its own models and engine (memory x N) and
    # keeps its own key cache and, without redis_url, its own rate-limit counters; the store is
    # shared. Python runs one request's code at a time per process: more workers use more cores.
    workers: int = Field(default=1, ge=1)
    # Base weights (llm/quantize.py): None serves an adapter on the full-precision base it was
    # trained and evaluated on, keeps a bare GGUF's Q4/Q8 blocks, and any other checkpoint in
    # full precision; "none" de-quantizes; "gguf" keeps the blocks under an adapter too;
    # "int8" / "int4" quantize at load. Cross blocks / the user-token path stay full precision.
    quantize: Literal["none", "gguf", "int8", "int4"] | None = None
    # Limits.
    max_body_bytes: int = Field(default=1 << 20, ge=1)
    max_events_per_request: int = Field(default=1000, ge=1)
    max_tokens: int = Field(default=256, ge=1)
    max_k: int = Field(default=100, ge=1)
    request_timeout_s: float = Field(default=60.0, gt=0)
    rate_limit: str = "600/minute"  # per API key; "" = off
    rate_limit_per_address: str = "3000/minute"  # per client address, keys or not; "" = off
    redis_url: str | None = None  # e.g. redis://127.0.0.1:6379/0; in-process counters otherwise
    rate_limit_namespace: str = "userllm"
    key_cache_s: float = Field(default=5.0, ge=0)  # how long a checked API key is trusted
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "info"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = _TOML_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    @classmethod
    def load(cls, toml_file: str | os.PathLike | None = None, **overrides: Any) -> "Settings":
        """Settings from the environment over `toml_file` (when given), under `overrides`."""
        if toml_file is not None and not Path(toml_file).is_file():
            raise FileNotFoundError(f"no settings file at {os.fspath(toml_file)!r}")
        _TOML_FILE["path"] = Path(toml_file) if toml_file is not None else None
        try:
            return cls(**overrides)
        finally:
            _TOML_FILE["path"] = None


_TOML_FILE: dict[str, Path | None] = {"path": None}
