"""AsyncEngine: concurrent streams, cancellation by task cancel, errors at the edge."""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine_fixtures import make_tiny_llama, random_prompts
from llm.engine import AsyncEngine, Engine, SamplingParams

SP = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-async"), seed=1)


def test_concurrent_streams_cancel_and_bad_input(tiny_path):
    prompts = random_prompts(3, [12, 30, 50], seed=11)
    expected = Engine.from_pretrained(tiny_path, kv_cache_bytes=1 << 21).generate(prompts, SP)
    engine = AsyncEngine.from_pretrained(tiny_path, kv_cache_bytes=1 << 21)
    sync = engine.engine

    async def consume(prompt, sampling=SP):
        chunks = []
        async for out in engine.stream(prompt, sampling):
            chunks.append(out)
        return chunks

    async def scenario():
        started = asyncio.Event()

        async def endless():
            async for _ in engine.stream(prompts[2], SamplingParams(temperature=0, max_tokens=400,
                                                                    ignore_eos=True)):
                started.set()

        victim = asyncio.create_task(endless())
        results = asyncio.gather(consume(prompts[0]), consume(prompts[1]))
        await started.wait()
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        with pytest.raises(ValueError, match="empty prompt"):
            await consume("")
        with pytest.raises(ValueError, match="no cross-attention"):
            await engine.add_request(prompts[0], user_tokens=torch.randn(2, 4))
        a, b = await results
        # A full request after the cancelled one still works.
        c = await engine.generate(prompts[2], SP)
        await engine.close()
        return a, b, c

    a, b, c = asyncio.run(scenario())
    for chunks, exp in ((a, expected[0]), (b, expected[1])):
        assert chunks[-1].finished and chunks[-1].token_ids == exp.token_ids
        assert sum((ch.new_token_ids for ch in chunks), []) == exp.token_ids
    assert c.token_ids == expected[2].token_ids
    assert not sync.has_unfinished()
    assert sync.block_manager.num_free_blocks == sync.block_manager.num_blocks
