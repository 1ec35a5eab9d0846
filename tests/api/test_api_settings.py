"""Service settings: a TOML file under the environment under explicit overrides; unknown keys
and bad values refused with a clear error."""
from __future__ import annotations

import pytest


def test_toml_env_and_overrides(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from api.service import Settings

    for var in ("USERLLM_PORT", "USERLLM_RATE_LIMIT", "USERLLM_MAX_TOKENS", "USERLLM_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    f = tmp_path / "serve.toml"
    f.write_text('port = 9000\nrate_limit = "10/second"\nmax_tokens = 16\nredis_url = "redis://127.0.0.1:6379/1"\n')
    s = Settings.load(f)
    assert (s.port, s.rate_limit, s.max_tokens, s.redis_url) == (9000, "10/second", 16, "redis://127.0.0.1:6379/1")
    monkeypatch.setenv("USERLLM_PORT", "9100")
    assert Settings.load(f).port == 9100  # the environment wins over the file
    assert Settings.load(f, port=9200).port == 9200  # explicit (command-line) values win over both
    assert Settings.load().port == 9100 and Settings.load().max_tokens == 256  # no file: defaults
    f.write_text("prot = 1\n")
    with pytest.raises(ValidationError, match="prot"):
        Settings.load(f)
    f.write_text("max_body_bytes = 0\n")
    with pytest.raises(ValidationError, match="max_body_bytes"):
        Settings.load(f)
    with pytest.raises(FileNotFoundError):
        Settings.load(tmp_path / "missing.toml")
