"""The synchronous engine: requests in, one scheduled forward per `step()`, outputs out.

    engine = Engine.from_pretrained(path, kv_cache_bytes=1 << 30)
    rid = engine.add_request([{"role": "user", "content": "Hi"}], sampling=SamplingParams())
    while engine.has_unfinished():
        for out in engine.step(): ...

Bad input (empty prompt, wrong user-token width, too long for the context or the pool) raises
ValueError in add_request before anything is queued, so the engine keeps serving the others.
Every public method holds one lock: AsyncEngine steps from a worker thread while the event loop
adds and cancels requests.
"""
from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass

import torch
from torch import nn

from llm.engine.beam_search import BeamSearch, TokenTrie
from llm.engine.block_manager import BlockManager, CrossBlockManager, user_salt
from llm.engine.decode_graphs import DecodeGraphRunner
from llm.engine.detokenizer import Detokenizer
from llm.engine.input_batch import InputBatch
from llm.engine.inputs import Prompt, checked_user_tokens, prompt_token_ids
from llm.engine.kv_cache import KVCache, PoolShape
from llm.engine.model_runner import ModelRunner
from llm.engine.sampling_params import SamplingParams
from llm.engine.scheduler import Scheduler
from llm.engine.sequence import FinishReason, RequestOutput, Sequence, SequenceStatus
from llm.engine.step_profile import StepProfile


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16
    # Self-attention pool budget; None: 1 GiB on CPU, half the free memory on CUDA.
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings
    max_user_tokens: int = 32  # K limit per request; sizes the cross pool
    enable_prefix_caching: bool = True
    # Decode steps through preallocated batch-size buckets, captured as CUDA graphs on CUDA
    # (personalized models too: padded cross block tables). None: on for CUDA, off for CPU.
    # On CPU True runs the same padded buffers eagerly: no speed-up there, it exists to test
    # the padding logic.
    use_cuda_graphs: bool | None = None
    # CPU fp32: MKL-packed weight copies (llm/layers/linear.py): 1.5-2x faster linears on
    # decode-sized batches, 7-25% on prefill chunks, for about the weights' memory again.
    cpu_packed_weights: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Every running sequence must be able to decode in every step.
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                             f">= max_num_seqs ({self.max_num_seqs})")
        if self.max_user_tokens < 1:
            raise ValueError(f"max_user_tokens must be >= 1, got {self.max_user_tokens}")


def _default_kv_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return 1 << 30


class Engine:
    def __init__(self, model: nn.Module, tokenizer, config: EngineConfig | None = None, *,
                 eos_token_ids: Seq[int] | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_config = mc = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        # User tokens go to cross-attention blocks, or (soft-prompt integration) in front of
        # the prompt as K placeholder tokens whose embeddings the model replaces.
        self.soft_prompt = mc.integration == "soft_prompt" and mc.user_dim is not None
        self.user_dim = mc.user_dim if (mc.cross_layer_indices or self.soft_prompt) else None
        pad = getattr(tokenizer, "pad_token_id", None)
        self.placeholder_id = int(pad) if pad is not None else 0
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None
                                 else _eos_ids(tokenizer))

        bs = config.block_size
        self_shape = PoolShape(mc.num_layers, mc.num_kv_heads, mc.head_dim, bs, self.dtype)
        budget = config.kv_cache_bytes or _default_kv_bytes(self.device)
        num_blocks = self_shape.blocks_for_bytes(budget)
        cross_shape, num_cross_blocks = None, 0
        if self.user_dim is not None and mc.cross_layer_indices:
            cross_shape = PoolShape(len(mc.cross_layer_indices), mc.cross_heads, mc.head_dim, bs,
                                    self.dtype)
            num_cross_blocks = config.max_num_seqs * -(-config.max_user_tokens // bs)
        self.kv_cache = KVCache(self_shape, num_blocks, cross_shape, num_cross_blocks,
                                self.device)
        self.kv_cache.bind(model)
        if config.cpu_packed_weights and self.device.type == "cpu":
            model.prepack_linears()
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.cross_manager = (CrossBlockManager(num_cross_blocks, bs)
                              if cross_shape is not None else None)
        self.scheduler = Scheduler(self.block_manager, self.cross_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        has_cross = cross_shape is not None
        self.inputs = InputBatch(config.max_num_seqs, -(-self.max_model_len // bs),
                                 -(-config.max_user_tokens // bs) if has_cross else 0,
                                 self.device)
        graphs = config.use_cuda_graphs
        if graphs is None:
            graphs = self.device.type == "cuda"
        decode = DecodeGraphRunner(model, self.inputs, bs, has_cross, bucketed=graphs,
                                   capture=graphs and self.device.type == "cuda")
        self.runner = ModelRunner(model, bs, self.device, self.inputs, decode, has_cross,
                                  soft_prompt=self.soft_prompt,
                                  eos_token_ids=tuple(sorted(self.eos_token_ids)))
        self.detokenizer = Detokenizer(tokenizer)
        self.profile = self.runner.profile = StepProfile()
        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self.num_steps = 0

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        kv_cache_bytes: int | None = None, block_size: int = 16,
                        max_num_seqs: int = 32, max_num_batched_tokens: int = 1024,
                        max_model_len: int | None = None, max_user_tokens: int = 32,
                        enable_prefix_caching: bool = True, use_cuda_graphs: bool | None = None,
                        cross_every_n: int = 0, user_dim: int | None = None,
                        adapter: str | os.PathLike | None = None,
                        quantize: str | None = None, group_size: int | None = None,
                        **load_kwargs) -> "Engine":
        """Load a Hugging Face folder (safetensors) or a .gguf file and build the engine.
        dtype/device default to fp32 on CPU, bf16 on CUDA when available.

        quantize (llm/quantize.py): None keeps a GGUF's Q4/Q8 blocks ("gguf") and loads any
        other checkpoint in full precision, except under an adapter, which is served in full
        precision (what it was trained and evaluated on) unless a mode is given; "none" de-quantizes a GGUF (the CLI's
        --dequantize); "int8" / "int4" quantize the base linears at load (group_size 32-128).
        The user-token modules (cross blocks, soft-prompt projection) stay full precision.
        An adapter with LoRA or trained base weights is merged into the float base first,
        then quantized only when "int8" / "int4" is asked for explicitly.

        adapter: a trained adapter folder (`userllm train-adapter`): the model is built with
        its integration and its weights loaded (LoRA merged into the base weights). It must
        have been trained on this base checkpoint (sha256 checked)."""
        from llm.loader import load_model

        if not os.path.exists(path):
            raise FileNotFoundError(f"model path {os.fspath(path)!r} does not exist")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        from llm.loader import resolve
        from llm.quantize import quantize_model, resolve_mode

        if adapter is not None and quantize is None:
            # An adapter is served on the base precision it was trained and evaluated on (fp32:
            # the parity with its training forward holds there); quantizing is asked for.
            quantize = "none"
        mode = resolve_mode(quantize, resolve(path)[1] is not None)
        adapter_cfg, quantize_after = None, None
        if adapter is not None:
            adapter_cfg = _checked_adapter(path, adapter, cross_every_n, user_dim, load_kwargs)
            load_kwargs = load_kwargs | adapter_cfg.load_kwargs()
            cross_every_n = load_kwargs.pop("cross_every_n")
            user_dim = load_kwargs.pop("user_dim")
            if (adapter_cfg.lora is not None or adapter_cfg.trains_base) and mode != "none":
                # Merging needs float base weights: load them, merge, then quantize if asked.
                if quantize == "gguf":
                    raise ValueError("this adapter changes the base weights (LoRA or full); "
                                     "GGUF blocks cannot be kept: use 'int8', 'int4' or "
                                     "'none'")
                quantize_after = mode if mode in ("int8", "int4") else None
                mode = "none"
        model, tokenizer, hf_config = load_model(path, dtype=dtype, device=device,
                                                 cross_every_n=cross_every_n, user_dim=user_dim,
                                                 quantize=mode, group_size=group_size,
                                                 **load_kwargs)
        if adapter_cfg is not None:
            from llm.adapter import apply_adapter

            apply_adapter(model, adapter, adapter_cfg)
        if quantize_after is not None:
            quantize_model(model, quantize_after, group_size)
        config = EngineConfig(block_size=block_size, kv_cache_bytes=kv_cache_bytes,
                              max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              max_model_len=max_model_len, max_user_tokens=max_user_tokens,
                              enable_prefix_caching=enable_prefix_caching,
                              use_cuda_graphs=use_cuda_graphs)
        eos = _eos_ids(tokenizer, hf_config, getattr(model, "generation_config", None))
        return cls(model, tokenizer, config, eos_token_ids=eos)

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, user_tokens: torch.Tensor | None = None,
                    sampling: SamplingParams | None = None, *,
                    request_id: str | None = None) -> str:
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        with self._lock:  # a fast tokenizer must not encode while a step decodes (threads)
            prompt_ids = prompt_token_ids(self.tokenizer, prompt, self.model_config.vocab_size)
        user = checked_user_tokens(user_tokens, self.user_dim, self.config.max_user_tokens)
        if user is not None:
            user = user.to(device=self.device, dtype=self.dtype).contiguous()
        if user is not None and self.soft_prompt:
            prompt_ids = [self.placeholder_id] * user.shape[0] + prompt_ids
        total = len(prompt_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens "
                             f"({sampling.max_tokens}) = {total} exceeds the context length "
                             f"{self.max_model_len}")
        if self.block_manager.blocks_needed(total) > self.block_manager.num_blocks:
            raise ValueError(f"prompt + max_tokens = {total} tokens needs more KV blocks than "
                             f"the whole pool has ({self.block_manager.num_blocks} blocks of "
                             f"{self.config.block_size}); raise kv_cache_bytes")
        seed = sampling.seed if not sampling.greedy else None  # None: the runner's generator
        with self._lock:
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if rid in self._seqs:
                raise ValueError(f"request id {rid!r} is already in use")
            seq = Sequence(rid, prompt_ids, sampling, user, user_salt(user_tokens), seed,
                           soft_prompt=self.soft_prompt)
            self._seqs[rid] = seq
            self.scheduler.add(seq)
        return rid

    def cancel(self, request_id: str) -> bool:
        """Stop a request and give back all its blocks. False if it is unknown or finished."""
        with self._lock:
            seq = self._seqs.pop(request_id, None)
            if seq is None:
                return False
            self.scheduler.remove(seq)
            self.inputs.release(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = FinishReason.CANCELLED
            return True

    def close(self) -> None:
        """Cancel everything, detach the pools from the model (which may outlive us) and drop
        the packed weight copies we made (their memory goes with them)."""
        with self._lock:
            for rid in list(self._seqs):
                self.cancel(rid)
            KVCache.unbind(self.model)
            self.model.drop_packed_linears()

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's idle entries (blocks held by running requests stay)."""
        with self._lock:
            return self.block_manager.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished()

    # -- stepping ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        with self._lock:
            prof = self.profile
            t0 = prof.clock()
            batch = self.scheduler.schedule()
            for seq in batch.preempted:
                self.inputs.release(seq)
            prof.schedule += prof.clock() - t0
            if not batch.seqs:
                return []
            sampled = self.runner.run(batch)
            t1 = prof.clock()
            self.num_steps += 1
            bm = self.block_manager
            bs = bm.block_size if bm.enable_prefix_caching else 1 << 62
            appended: list[tuple[Sequence, FinishReason | None]] = []
            for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled):
                seq.num_computed_tokens += n
                if seq.cross_block_table:
                    seq.cross_written = True
                if seq.num_computed_tokens >= (len(seq.block_hashes) + 1) * bs:
                    bm.register_full_blocks(seq)  # a block filled up: publish it
                if token is not None:
                    appended.append((seq, self._append_token(seq, token)))
            with_text = [(s, r) for s, r in appended if s.sampling.detokenize]
            t2 = prof.clock()
            texts = iter(self.detokenizer.update([s for s, _ in with_text],
                                                 [r is not None for _, r in with_text])
                         if with_text else ())
            t3 = prof.clock()
            outputs = []
            for seq, reason in appended:
                new_text = ""
                if seq.sampling.detokenize:
                    new_text, stopped = next(texts)
                    if stopped:
                        reason = FinishReason.STOP
                outputs.append(self._output(seq, reason, new_text))
            prof.detokenize += t3 - t2
            prof.bookkeeping += prof.clock() - t3 + t2 - t1
            prof.steps += 1
            return outputs

    def _append_token(self, seq: Sequence, token: int) -> FinishReason | None:
        """Append a sampled token; the finish reason it causes by itself (not stop strings)."""
        seq.token_ids.append(token)
        p = seq.sampling
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return FinishReason.STOP
        if len(seq.token_ids) - seq.num_prompt_tokens >= p.max_tokens \
                or len(seq.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _output(self, seq: Sequence, reason: FinishReason | None, new_text: str
                ) -> RequestOutput:
        start = seq.num_prompt_tokens
        new_ids = seq.token_ids[start + seq.num_emitted_tokens:]
        seq.num_emitted_tokens = len(seq.token_ids) - start
        if reason is not None:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = reason
            self.scheduler.remove(seq)
            self.inputs.release(seq)
            del self._seqs[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=new_ids, new_text=new_text,
            token_ids=seq.token_ids[start:], text=seq.text, finished=reason is not None,
            finish_reason=reason.value if reason is not None else None,
            num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens)

    # -- conveniences ------------------------------------------------------------------------
    def generate(self, prompts: Seq[Prompt], sampling: SamplingParams | Seq[SamplingParams] |
                 None = None, user_tokens: torch.Tensor | Seq[torch.Tensor | None] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion (with whatever else is queued); final outputs in order."""
        n = len(prompts)
        samplings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * n
        users = list(user_tokens) if isinstance(user_tokens, (list, tuple)) else [user_tokens] * n
        if len(samplings) != n or len(users) != n:
            raise ValueError("sampling / user_tokens lists must match the prompts")
        ids = []
        try:
            for prompt, sp, user in zip(prompts, samplings, users):
                ids.append(self.add_request(prompt, user, sp))
        except ValueError:
            for rid in ids:
                self.cancel(rid)
            raise
        final: dict[str, RequestOutput] = {}
        pending = set(ids)
        while pending:
            for out in self.step():
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
        return [final[rid] for rid in ids]

    def stream(self, prompt: Prompt, sampling: SamplingParams | None = None,
               user_tokens: torch.Tensor | None = None) -> Iterator[RequestOutput]:
        """Yield this request's outputs as they come, stepping the engine (other queued requests
        advance too; their outputs go to nobody here: use AsyncEngine for many streams).
        Closing the iterator early cancels the request."""
        rid = self.add_request(prompt, user_tokens, sampling)
        finished = False
        try:
            while not finished:
                for out in self.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.cancel(rid)

    def beam_search(self, prompts: Seq[Prompt], trie: TokenTrie | Seq[TokenTrie],
                    beam_width: int = 10, user_tokens: Seq[torch.Tensor | None] | None = None
                    ) -> list[list[tuple[list[int], float]]]:
        """Beam search constrained to `trie` (one, or one per prompt; llm/engine/beam_search.py)
        on this engine's model and paged path, run between steps (it holds the engine lock;
        the engine's own pool is untouched). Prompts sharing a prefix and user tokens are
        prefilled once. Per prompt: [(answer token ids, summed log-prob)], best first."""
        users = list(user_tokens) if user_tokens is not None else [None] * len(prompts)
        tries = list(trie) if isinstance(trie, (list, tuple)) else [trie] * len(prompts)
        if len(users) != len(prompts) or len(tries) != len(prompts):
            raise ValueError("user_tokens and tries must match the prompts")
        with self._lock:
            ids = [prompt_token_ids(self.tokenizer, p, self.model_config.vocab_size)
                   for p in prompts]
            users = [checked_user_tokens(u, self.user_dim, self.config.max_user_tokens)
                     for u in users]
            for p, u, t in zip(ids, users, tries):
                extra = u.shape[0] if u is not None and self.soft_prompt else 0
                if len(p) + extra + t.max_length > self.max_model_len:
                    raise ValueError(f"prompt ({len(p)} tokens) + the longest answer "
                                     f"({t.max_length}) exceed the context length "
                                     f"{self.max_model_len}")
            searcher = BeamSearch(self.model, self.config.block_size)
            return searcher.run(ids, tries, beam_width, users)

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_blocks": bm.num_blocks, "free_blocks": bm.num_free_blocks,
            "num_cross_blocks": self.cross_manager.pool.num_blocks if self.cross_manager else 0,
            "free_cross_blocks": self.cross_manager.num_free_blocks if self.cross_manager else 0,
            "kv_cache_bytes": self.kv_cache.nbytes, "block_size": self.config.block_size,
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_hit_tokens": bm.num_hit_tokens, "prefix_queried_tokens": bm.num_queried_tokens,
            "num_steps": self.num_steps,
        }


def _checked_adapter(path, adapter, cross_every_n: int, user_dim: int | None, load_kwargs):
    """The adapter's LLM settings, after checking it fits this base model and these args."""
    from llm.adapter import checkpoint_sha256, read_adapter

    cfg, meta = read_adapter(adapter)
    expected = (meta.get("base_model") or {}).get("sha256")
    if expected and expected != checkpoint_sha256(path):
        raise ValueError(f"adapter {os.fspath(adapter)!r} was trained on another base model "
                         f"than {os.fspath(path)!r} (sha256 differs)")
    wanted = cfg.load_kwargs()
    given = {"cross_every_n": cross_every_n, "user_dim": user_dim} | load_kwargs
    clash = [k for k, v in wanted.items()
             if k in given and given[k] not in (None, 0, v) and k != "integration"]
    if clash:
        raise ValueError(f"adapter settings {clash} differ from the arguments given; "
                         "leave them out: the adapter decides")
    return cfg


def _eos_ids(tokenizer, hf_config=None, generation_config=None) -> list[int]:
    ids: set[int] = set()
    for source in (generation_config, hf_config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)

