"""One request's state as it moves through the engine: waiting -> running -> finished, and back
to waiting when preempted (recompute: its KV is dropped; prompt + output so far is recomputed)."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import torch

from llm.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # eos, a stop token or a stop string
    CANCELLED = "cancelled"


_arrival = itertools.count()


class Sequence:
    __slots__ = (
        "request_id", "token_ids", "num_prompt_tokens", "sampling", "user_tokens", "salt",
        "status", "num_computed_tokens", "num_cached_tokens", "block_table", "block_hashes",
        "cross_block_table", "cross_written", "seed", "arrival", "finish_reason",
        "text", "num_emitted_tokens", "num_emitted_chars", "num_preemptions", "num_soft_tokens",
        "row", "num_synced_blocks", "prefix_offset", "read_offset",
    )

    def __init__(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                 user_tokens: torch.Tensor | None, salt: bytes,
                 seed: int | None, soft_prompt: bool = False) -> None:
        assert prompt_ids, "empty prompts are refused at add_request"
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.sampling = sampling
        self.user_tokens = user_tokens  # [K, D] on the model's device/dtype, or None
        self.salt = salt  # prefix-cache salt: a hash of the user tokens' bytes
        self.status = SequenceStatus.WAITING
        # Tokens whose K/V sit in the cache (prefix-cache hits included).
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hits at the last admission (for stats)
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # hash chain of this sequence's full blocks
        self.cross_block_table: list[int] = []
        self.cross_written = False  # cross K/V computed into cross_block_table
        self.seed = seed  # a sampling request's own noise (llm/engine/batch_sampler.py)
        self.arrival = next(_arrival)
        self.finish_reason: FinishReason | None = None
        # Detokenization / streaming state.
        self.text = ""
        self.num_emitted_tokens = 0
        self.num_emitted_chars = 0
        # Incremental detokenization: token_ids[prefix_offset:read_offset] decode to the text
        # already produced; what follows read_offset is new (llm/engine/detokenizer.py).
        self.prefix_offset = self.read_offset = len(prompt_ids)
        self.num_preemptions = 0
        # The InputBatch row this sequence holds while running (-1: none) and how many of its
        # block-table entries that row has.
        self.row = -1
        self.num_synced_blocks = 0
        # Soft-prompt integration: the first num_soft_tokens entries of token_ids are
        # placeholders whose embeddings the model replaces with the projected user tokens.
        self.num_soft_tokens = self.num_user_tokens if soft_prompt else 0
        assert len(prompt_ids) > self.num_soft_tokens, "a prompt beyond the user tokens"

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_user_tokens(self) -> int:
        return 0 if self.user_tokens is None else int(self.user_tokens.shape[0])

    @property
    def num_cross_tokens(self) -> int:
        """User tokens that go to the cross-attention pool (0 in soft-prompt mode)."""
        return 0 if self.num_soft_tokens else self.num_user_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """After preemption: no KV left; the whole token list is recomputed at next admission."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.block_hashes = []
        self.cross_block_table = []
        self.cross_written = False
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request. `new_*` are the delta since the last output
    (what a stream sends); `text`/`token_ids` are the whole output so far."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
