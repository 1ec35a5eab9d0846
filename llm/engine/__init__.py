"""The serving engine: paged KV cache with a salted prefix cache, continuous batching with
chunked prefill and preemption, per-request sampling, streaming, an asyncio wrapper.

    from llm import Engine, SamplingParams, AsyncEngine

    engine = Engine.from_pretrained(path, kv_cache_bytes=1 << 30, cross_every_n=4, user_dim=64)
    rid = engine.add_request([{"role": "user", "content": "Hi"}], user_tokens=u,  # [K, 64]
                             sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=1))
    while engine.has_unfinished():
        for out in engine.step():          # RequestOutput: new_text / new_token_ids / finished
            ...
    engine.generate(prompts, SamplingParams(temperature=0), user_tokens=[u, None, ...])
    for out in engine.stream(prompt, sampling): ...      # one request, closing it cancels
    engine.cancel(rid)                                   # frees its self and cross blocks

    async_engine = AsyncEngine(engine)                  # or AsyncEngine.from_pretrained(...)
    async for out in async_engine.stream(prompt, sampling, user_tokens): ...

One engine per model instance: the engine assigns its pools to the model's attention modules
(`Engine.close()` detaches them).
"""
from llm.engine.async_engine import AsyncEngine
from llm.engine.engine import Engine, EngineConfig
from llm.engine.sampling_params import SamplingParams
from llm.engine.sequence import RequestOutput

__all__ = ["AsyncEngine", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
