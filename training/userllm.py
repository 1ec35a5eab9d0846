"""Stage 2 of USER-LLM: a frozen LLM, the user encoder, and what trains between them.

Arms (what the LLM is told about the user):
- "userllm": K user tokens from the encoder (Perceiver resampler + projection), read through
  gated cross-attention every n layers ("xattn") or as a soft prompt ("softprompt").
- "text": the history pasted into the prompt as text; "none": the question alone.

Strategies (what trains), after the paper:
- proj: the user-token head (resampler + projection) and the cross blocks / soft-prompt
  projection; the encoder's body and the LLM are frozen.
- enc:  proj + the whole encoder.
- lora: enc + LoRA (peft) on the LLM's self-attention projections.
- full: enc + every LLM weight.
The text and none arms have no encoder: they train LoRA ("lora"), everything ("full") or
nothing ("zeroshot").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.adapter import add_lora
from training.config import AdapterConfig
from userenc.model import UserEncoder

class UserLLM(nn.Module):
    """The LLM (our LlamaForCausalLM, with user modules when the arm has an encoder) and the
    encoder; requires_grad set by the strategy. forward() is the teacher-forced answer loss."""

    def __init__(self, llm: nn.Module, encoder: UserEncoder | None, cfg: AdapterConfig) -> None:
        super().__init__()
        assert (encoder is not None) == cfg.uses_encoder
        self.cfg = cfg
        if cfg.uses_lora:
            add_lora(llm, cfg.llm_config(None).lora)
        self.llm, self.encoder = llm, encoder
        for p in self.parameters():
            p.requires_grad_(False)
        for name, p in self.named_parameters():
            p.requires_grad_(self._trains(name))

    def _trains(self, name: str) -> bool:
        s = self.cfg.strategy
        if name.startswith("encoder."):
            sub = name[len("encoder."):]
            return s != "proj" or sub.startswith(("resampler.", "proj.", "hints."))
        if ".lora_" in name:
            return True
        if name.startswith(("llm.model.cross_blocks.", "llm.model.soft_prompt.")):
            return True
        return s == "full"

    @property
    def encoder_trains(self) -> bool:
        return self.encoder is not None and self.cfg.strategy != "proj"

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def train(self, mode: bool = True) -> "UserLLM":
        super().train(mode)
        self.llm.eval()  # no dropout in the LLM (LoRA's is 0); the encoder's, if it trains
        if self.encoder is not None and not self.encoder_trains:
            self.encoder.eval()
        return self

    def user_tokens(self, enc_ids: dict[str, torch.Tensor], enc_valid: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, K, D] user tokens and their mask, with gradients where the strategy trains."""
        assert self.encoder is not None
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trains):
            states = self.encoder.states(enc_ids, enc_valid)
        return self.encoder.user_tokens(states, enc_valid, enc_ids)

    def forward(self, input_ids: torch.Tensor, label_rows: torch.Tensor,
                label_cols: torch.Tensor, labels: torch.Tensor,
                enc_ids: dict[str, torch.Tensor] | None = None,
                enc_valid: torch.Tensor | None = None, reduce: bool = True) -> torch.Tensor:
        """Mean cross-entropy of the answer tokens (reduce=False: one per answer token):
        position (label_rows[i], label_cols[i]) of the right-padded batch input_ids [B, T]
        predicts labels[i]."""
        tokens = mask = None
        if self.encoder is not None:
            assert enc_ids is not None and enc_valid is not None
            tokens, mask = self.user_tokens(enc_ids, enc_valid)
        hidden = self.llm(input_ids, user_tokens=tokens, user_mask=mask)
        logits = self.llm.compute_logits(hidden[label_rows, label_cols])
        return F.cross_entropy(logits.float(), labels, reduction="mean" if reduce else "none")


@torch.no_grad()
def init_hint_reader(llm: nn.Module, probe_ids: torch.Tensor) -> float:
    """The last cross block starts as a copier: values the identity and the output projection
    c x identity, c the residual stream's RMS where the block sits (the base model reading
    `probe_ids`, a task prompt). Once its gate opens it adds the attended hint rows -- centred
    mean title embeddings, RMS-normalised -- to the residual at the residual's own scale, and
    the tied LM head reads them as those titles' tokens. From random projections at unit scale
    the block had to find that map itself and grow it ~30x (SmolLM2's residual RMS is 29 at
    layer 29): within a CPU budget it only learned the popular titles. The gate still starts
    at 0, so the fresh adapter still equals the base model. Returns c."""
    blocks = llm.model.cross_blocks
    index = max(int(i) for i in blocks)
    last = blocks[str(index)].cross_attn
    v, o = last.v_proj.weight, last.o_proj.weight
    assert v.shape[0] == v.shape[1] == o.shape[0] == o.shape[1], \
        "a copying hint reader needs user_dim = cross heads x head_dim = hidden size"
    seen: list[torch.Tensor] = []
    hook = llm.model.layers[index].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach()))
    try:
        llm(probe_ids.to(v.device))
    finally:
        hook.remove()
    scale = float(seen[0][..., -1, :].float().pow(2).mean().sqrt())
    v.copy_(torch.eye(v.shape[0], dtype=v.dtype))
    o.copy_(scale * torch.eye(o.shape[0], dtype=o.dtype))
    return scale


def parameter_counts(model: UserLLM) -> dict[str, int]:
    """Trained parameters by part (tied tensors counted once), and the frozen rest."""
    counts = {"encoder": 0, "user_modules": 0, "lora": 0, "llm_base": 0, "frozen": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not p.requires_grad:
            counts["frozen"] += p.numel()
        elif name.startswith("encoder."):
            counts["encoder"] += p.numel()
        elif ".lora_" in name:
            counts["lora"] += p.numel()
        elif name.startswith(("llm.model.cross_blocks.", "llm.model.soft_prompt.")):
            counts["user_modules"] += p.numel()
        else:
            counts["llm_base"] += p.numel()
    counts["trained"] = sum(v for k, v in counts.items() if k != "frozen")
    return counts
