"""Load a checkpoint into our modules: a Hugging Face folder (config.json + safetensors) or a
GGUF file (dequantised by transformers' GGUF support, or with quantize="gguf" its Q4/Q8 blocks
kept as they are: llm/quantize.py). Config and tokenizer always come through transformers'
Auto classes.

    model, tokenizer, hf_config = load_model(path, dtype=torch.float32, device="cpu",
                                             cross_every_n=0, user_dim=None)

The model is built on the meta device and materialised once: base weights from the checkpoint,
our own user-token modules (cross blocks / soft-prompt projection) either from the checkpoint
(when it has them, e.g. a trained adapter saved with our names) or freshly initialised from
`seed` (gates at 0, so a fresh model equals the base model).
"""
from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from llm.config import ModelConfig
from llm.model import LlamaForCausalLM

USER_MODULE_PREFIXES = ("model.cross_blocks.", "model.soft_prompt.")


@dataclass(slots=True)
class Checkpoint:
    hf_config: Any
    tokenizer: Any
    state_dict: dict[str, torch.Tensor]


def resolve(path: str | Path) -> tuple[Path, str | None]:
    """(folder, gguf file name or None); clear errors for anything we cannot load."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"model file {str(p)!r} is not a .gguf file; give a GGUF file or a "
                             "Hugging Face folder with config.json and *.safetensors")
        return p.parent, p.name
    if not (p / "config.json").is_file() or not list(p.glob("*.safetensors")):
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        raise ValueError(f"model folder {str(p)!r} needs config.json and *.safetensors "
                         "(or exactly one .gguf file)")
    return p, None


def read_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Config, tokenizer and the full state dict (CPU tensors, `dtype` for floating ones)."""
    from transformers import AutoConfig, AutoTokenizer

    folder, gguf = resolve(path)
    if gguf:
        from transformers import AutoModelForCausalLM

        with _gguf_parsed_once():
            hf_config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
            # transformers de-quantises GGUF blocks and undoes llama.cpp's q/k permutation.
            hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf,
                                                            config=hf_config, dtype=dtype)
        state = dict(hf_model.state_dict())
        del hf_model
    else:
        hf_config = AutoConfig.from_pretrained(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"model folder {str(folder)!r} has no usable tokenizer "
                             f"({first_line})") from exc
        state = _read_safetensors(folder)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return Checkpoint(hf_config, tokenizer, state)


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses the GGUF file once for the config, once for the tokenizer and once
    for the weights, and rebuilds gguf's tensor-name table once per module (~400 times for a
    30-layer model): over half of a SmolLM2 load. Within this block the reader is shared per
    path and the table per (arch, layers). Both are read-only after construction."""
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def build_model(hf_config: Any, state_dict: dict[str, torch.Tensor], *,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                integration: str = "cross", cross_every_n: int = 0,
                user_dim: int | None = None, cross_heads: int | None = None,
                cross_intermediate_size: int | None = None, seed: int = 0) -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf(hf_config, integration=integration, cross_every_n=cross_every_n,
                              user_dim=user_dim, cross_heads=cross_heads,
                              cross_intermediate_size=cross_intermediate_size)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_word_embeddings:  # to_empty() unties; tie again before loading
        model.lm_head.weight = model.model.embed_tokens.weight
    state = {k: v for k, v in state_dict.items() if "rotary_emb" not in k}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings
                                                      and k == "lm_head.weight")}
    base = {k for k in expected if not k.startswith(USER_MODULE_PREFIXES)}
    missing = base - state.keys()
    unexpected = {k for k in state.keys() - expected if not k.startswith(USER_MODULE_PREFIXES)}
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the architecture: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    user_keys = {k for k in expected if k.startswith(USER_MODULE_PREFIXES)}
    found_user = user_keys & state.keys()
    if found_user and found_user != user_keys:
        raise ValueError(f"checkpoint has some user-module weights but not all: missing "
                         f"{sorted(user_keys - found_user)[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    if not found_user:  # after the base weights: the soft prompt is scaled to the embeddings
        init_user_modules(model, seed)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def init_user_modules(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Fresh cross blocks / soft-prompt projection, seeded (independent of the global RNG):
    zero gates (a block starts as the identity, the model equals its base model), zero
    biases, unit norms, and variance-preserving weights (std 1/sqrt(fan_in)). The soft-prompt
    projection is scaled so its outputs have the spread of the model's token embeddings.

    Not GPT's fixed 0.02: behind a zero gate, a block whose attention and MLP outputs are
    tiny gives its gate almost no gradient, and its weights get none until the gate opens;
    with 0.02 a stage-2 run on a CPU budget barely moved off the base model."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    emb_std = _embedding_std(model.model.embed_tokens)
    users = list(model.model.cross_blocks.values())
    if model.model.soft_prompt is not None:
        users.append(model.model.soft_prompt)
    for root in users:
        for name, param in root.named_parameters():
            if name.startswith("gate_") or name.endswith("bias"):
                param.zero_()
            elif "norm" in name:
                param.fill_(1.0)
            else:
                fan_in = param.shape[-1]
                scale = emb_std if root is model.model.soft_prompt else 1.0
                param.copy_(torch.randn(param.shape, generator=gen) * scale / fan_in ** 0.5)


def _embedding_std(emb: torch.nn.Module) -> float:
    if isinstance(emb, torch.nn.Embedding):
        return float(emb.weight.float().std())
    # A quantized table: read in chunks of rows, never the whole table in fp32.
    n, total, sq = emb.num_embeddings, 0.0, 0.0
    for start in range(0, n, 4096):
        rows = emb(torch.arange(start, min(n, start + 4096))).double()
        total, sq = total + float(rows.sum()), sq + float((rows * rows).sum())
    count = n * emb.embedding_dim
    return ((sq - total * total / count) / (count - 1)) ** 0.5


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", cross_every_n: int = 0,
               user_dim: int | None = None, *, integration: str = "cross",
               cross_heads: int | None = None, cross_intermediate_size: int | None = None,
               seed: int = 0, quantize: str = "none",
               group_size: int | None = None) -> tuple[LlamaForCausalLM, Any, Any]:
    """-> (model, tokenizer, hf_config). FileNotFoundError for a missing path, ValueError for
    anything else we cannot load (wrong file kind, unsupported architecture, bad settings).

    quantize (llm/quantize.py): "none" (default here: training wants the fp32 base),
    "int8" / "int4" (base linears quantized at load), "gguf" (a GGUF's blocks kept as they
    are, never de-quantized to fp32). User-token modules always stay full precision."""
    from llm.quantize import build_gguf_quantized, quantize_model, resolve_mode

    _, gguf = resolve(path)
    mode = resolve_mode(quantize, bool(gguf))
    if mode == "gguf":
        return _load_gguf_kept(path, dtype, device, cross_every_n, user_dim, integration,
                               cross_heads, cross_intermediate_size, seed, build_gguf_quantized)
    ckpt = read_checkpoint(path, dtype=torch.float32)
    model = build_model(ckpt.hf_config, ckpt.state_dict, dtype=dtype, device=device,
                        integration=integration, cross_every_n=cross_every_n,
                        user_dim=user_dim, cross_heads=cross_heads,
                        cross_intermediate_size=cross_intermediate_size, seed=seed)
    if mode != "none":
        ckpt.state_dict.clear()  # the float copy goes before the quantized one is made
        quantize_model(model, mode, group_size)
    return model, ckpt.tokenizer, ckpt.hf_config


def _load_gguf_kept(path, dtype, device, cross_every_n, user_dim, integration, cross_heads,
                    cross_intermediate_size, seed, build):
    from transformers import AutoConfig, AutoTokenizer

    folder, gguf = resolve(path)
    with _gguf_parsed_once():
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    cfg = ModelConfig.from_hf(hf_config, integration=integration, cross_every_n=cross_every_n,
                              user_dim=user_dim, cross_heads=cross_heads,
                              cross_intermediate_size=cross_intermediate_size)
    model = build(folder / gguf, cfg, LlamaForCausalLM)
    init_user_modules(model, seed)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, hf_config
