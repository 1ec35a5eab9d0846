"""userllm's LLM side: the Llama-family model with user-token integration (llm.model,
llm.loader), the paged-attention kernels (llm.kernels) and the serving engine (llm.engine).

The engine's public names are re-exported here lazily, so `import llm.kernels` stays light:
    from llm import Engine, SamplingParams, AsyncEngine
"""
from __future__ import annotations

__all__ = ["AsyncEngine", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name in __all__:
        import llm.engine as engine

        return getattr(engine, name)
    raise AttributeError(f"module 'llm' has no attribute {name!r}")
