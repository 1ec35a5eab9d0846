"""The serving engine: paged KV cache with a salted prefix cache, continuous batching with
chunked prefill and preemption, per-request sampling, streaming, an asyncio wrapper."""
from llm.engine.async_engine import AsyncEngine
from llm.engine.engine import Engine, EngineConfig
from llm.engine.sampling_params import SamplingParams
from llm.engine.sequence import RequestOutput

__all__ = ["AsyncEngine", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
