"""Weight-only quantized linears: int8 and int4 with group-wise scales (group 32-128).

Two forms of one weight W [N, K]:

- `QuantizedTensor`: the canonical, lossless form (q codes + fp32 scale/zero per group of
  `group_size` inputs). int4: w = scale * (q - 8) + zero, q in 0..15 (torch's int4pack
  convention; GGUF Q4_0 is zero = 0, Q4_1's w = d*q + m is zero = m + 8d). int8: w = scale * q,
  q in -128..127 (GGUF Q8_0 exactly). Made from floats (`quantize_int4/8`) or from GGUF blocks
  (llm/gguf_blocks.py), compared against references in the tests.
- `QuantLinear`: what the model runs. Codes in the layout torch's CPU kernels read (int4:
  `_convert_weight_to_int4pack_for_cpu`'s 32-row interleave; int8: [G, N, group] so one
  group's codes are a contiguous [N, group] matrix), scales in bf16: those kernels are fast
  only with bf16 activations and scales (fp32 runs a scalar loop, 10-15x slower, measured).
  The bf16 scales round a group's scale by <= 2^-9 relative, far below one int4/int8 step.

Forward on CPU, by row count (a decode step has one row per sequence, a prefill chunk many):
- < DEQUANT_MIN_ROWS: torch's packed int4/int8 GEMV/GEMM on bf16 activations (reads 4 or 8
  bits per weight: decode is memory-bound);
- otherwise: de-quantize the layer into a shared scratch buffer and run fp32 MKL GEMM (the
  packed int ops are 2.3-2.5x slower than fp32 GEMM at 64-1024 rows; de-quantizing a layer
  costs ~10% of one 256-row GEMM). Its inputs/outputs are rounded to bf16 like the int path,
  so a sequence's result hardly depends on how many rows shared its step (batch invariance).
On CUDA: the Triton dequant-GEMM (llm/kernels/quant_matmul.py) in the activations' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

QUANT_BITS = {"int8": 8, "int4": 4}
DEQUANT_MIN_ROWS = 32  # from here on dequantize + fp32 GEMM was measured faster
PACK_ROWS = 32  # int4pack interleaves blocks of 32 output rows (AVX2 and AVX512 kernels)


@dataclass(slots=True)
class QuantizedTensor:
    bits: int
    group_size: int
    q: torch.Tensor  # [N, K] int4: uint8 0..15, int8: int8
    scale: torch.Tensor  # [N, K // group_size] float32
    zero: torch.Tensor | None  # int4: [N, K // group_size] float32; int8: None (symmetric)

    def __post_init__(self) -> None:
        n, k = self.q.shape
        assert self.bits in (4, 8) and k % self.group_size == 0, (self.bits, k, self.group_size)
        assert self.scale.shape == (n, k // self.group_size)
        assert (self.zero is None) == (self.bits == 8)

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        q = self.q.float().view(n, -1, self.group_size)
        if self.bits == 4:
            w = (q - 8) * self.scale[..., None] + self.zero[..., None]
        else:
            w = q * self.scale[..., None]
        return w.view(n, k)

    def permute_rows(self, index: torch.Tensor) -> "QuantizedTensor":
        """Rows reordered (blocks run along K, so a row permutation is lossless)."""
        return QuantizedTensor(self.bits, self.group_size, self.q[index], self.scale[index],
                               None if self.zero is None else self.zero[index])


def quantize_int4(w: torch.Tensor, group_size: int) -> QuantizedTensor:
    """Asymmetric per group: the group's min and max map to codes 0 and 15."""
    n, k = w.shape
    g = w.detach().float().view(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return QuantizedTensor(4, group_size, q.view(n, k), scale, lo + 8 * scale)


def quantize_int8(w: torch.Tensor, group_size: int) -> QuantizedTensor:
    """Symmetric per group: the group's largest magnitude maps to code 127."""
    n, k = w.shape
    g = w.detach().float().view(n, k // group_size, group_size)
    scale = (g.abs().amax(-1) / 127).clamp(min=1e-10)
    q = (g / scale[..., None]).round().clamp(-128, 127).to(torch.int8)
    return QuantizedTensor(8, group_size, q.view(n, k), scale, None)


def quantizable(in_features: int, out_features: int, group_size: int) -> bool:
    return in_features % group_size == 0 and out_features % PACK_ROWS == 0


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[N, K] uint8 codes from the CPU int4pack layout: in each block of 32 rows, byte
    k*16 + j holds row j (low nibble) and row j+16 (high nibble) of column k."""
    b = packed.view(n // PACK_ROWS, k, PACK_ROWS // 2)
    q = torch.cat([b & 0xF, b >> 4], dim=2)  # [N/32, K, 32]
    return q.transpose(1, 2).reshape(n, k)


_scratch: dict[torch.device, torch.Tensor] = {}


def _scratch_weight(n: int, k: int, device: torch.device) -> torch.Tensor:
    """One fp32 buffer shared by all layers (one layer is de-quantized at a time)."""
    buf = _scratch.get(device)
    if buf is None or buf.numel() < n * k:
        buf = _scratch[device] = torch.empty(n * k, device=device)
    return buf[:n * k].view(n, k)


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as int4/int8 codes; bias (if any) stays full precision."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, device=None) -> None:
        super().__init__()
        assert bits in (4, 8) and quantizable(in_features, out_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size
        if bits == 4:
            q = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
            sz = torch.empty(groups, out_features, 2, dtype=torch.bfloat16, device=device)
        else:
            q = torch.empty(groups, out_features, group_size, dtype=torch.int8, device=device)
            sz = torch.empty(groups, out_features, dtype=torch.bfloat16, device=device)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", sz)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not cast the codes' scales: the CPU kernels need them in bf16.
        dtypes = {name: b.dtype for name, b in self._buffers.items()}
        super()._apply(fn, recurse)
        for name, b in self._buffers.items():
            if b.dtype != dtypes[name]:
                self._buffers[name] = b.to(dtypes[name])
        return self

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int) -> "QuantLinear":
        quant = quantize_int4 if bits == 4 else quantize_int8
        mod = cls(linear.in_features, linear.out_features, bits, group_size,
                  bias=linear.bias is not None, device=linear.weight.device)
        mod.load_quantized(quant(linear.weight, group_size), linear.bias)
        return mod

    @torch.no_grad()
    def load_quantized(self, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        n, k = qt.q.shape
        assert (n, k) == (self.out_features, self.in_features) and qt.bits == self.bits
        assert qt.group_size == self.group_size
        if self.bits == 4:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                qt.q.to("cpu", torch.int32).contiguous(), 1)
            self.qweight.copy_(packed)
            self.scales.copy_(torch.stack([qt.scale.t(), qt.zero.t()], dim=-1))
        else:
            self.qweight.copy_(qt.q.view(n, -1, self.group_size).transpose(0, 1))
            self.scales.copy_(qt.scale.t())
        if bias is not None:
            self.bias.copy_(bias)

    def quantized(self) -> QuantizedTensor:
        """Back to the canonical form (scales as stored: bf16 values in fp32)."""
        n, k, gs = self.out_features, self.in_features, self.group_size
        if self.bits == 4:
            q = unpack_int4(self.qweight, n, k)
            return QuantizedTensor(4, gs, q, self.scales[..., 0].t().float(),
                                   self.scales[..., 1].t().float())
        return QuantizedTensor(8, gs, self.qweight.transpose(0, 1).reshape(n, k),
                               self.scales.t().float(), None)

    @torch.no_grad()
    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """W [N, K] in fp32 (into `out` when given)."""
        n, k, gs = self.out_features, self.in_features, self.group_size
        out = torch.empty(n, k, device=self.qweight.device) if out is None else out
        w = out.view(n, k // gs, gs)
        if self.bits == 4:
            w.copy_(unpack_int4(self.qweight, n, k).view(n, k // gs, gs))
            sz = self.scales.float()
            w.sub_(8).mul_(sz[..., 0].t()[..., None]).add_(sz[..., 1].t()[..., None])
        else:
            w.copy_(self.qweight.transpose(0, 1))
            w.mul_(self.scales.t().float()[..., None])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda:
            from llm.kernels.quant_matmul import quant_matmul_triton
            out = quant_matmul_triton(x2, self.qweight, self.scales, self.bits, self.group_size)
        elif x2.shape[0] >= DEQUANT_MIN_ROWS or torch.is_grad_enabled() and x2.requires_grad:
            w = self.dequantize(_scratch_weight(self.out_features, self.in_features, x2.device))
            out = F.linear(x2.to(torch.bfloat16).float(), w).to(torch.bfloat16)
        else:
            out = self._packed_mm(x2.to(torch.bfloat16))
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*lead, self.out_features)

    def _packed_mm(self, xb: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qweight, self.group_size,
                                                              self.scales)
        groups = self.qweight.shape[0]
        if groups == 1:
            return torch.ops.aten._weight_int8pack_mm(xb, self.qweight[0], self.scales[0])
        # Group-wise int8 (GGUF Q8_0): one per-channel GEMV per group, summed in fp32.
        xg = xb.view(xb.shape[0], groups, self.group_size)
        out = torch.zeros(xb.shape[0], self.out_features)
        for g in range(groups):
            out += torch.ops.aten._weight_int8pack_mm(xg[:, g], self.qweight[g],
                                                      self.scales[g]).float()
        return out.to(torch.bfloat16)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{self.bits}, group_size={self.group_size}, bias={self.bias is not None}")


class QuantEmbedding(nn.Module):
    """Token embeddings read from a tied LM head's quantized weight (one copy for both)."""

    def __init__(self, head: QuantLinear) -> None:
        super().__init__()
        # Empty; follows the model's .to(dtype), so lookups come out in the model's dtype.
        self.register_buffer("dtype_ref", torch.empty(0, device=head.qweight.device),
                             persistent=False)
        self.head = [head]  # a list: not a submodule, so its buffers are not listed twice
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        flat = ids.reshape(-1).long()
        k, gs = head.in_features, head.group_size
        if head.bits == 4:
            blocks = head.qweight.view(-1, k, PACK_ROWS // 2)[flat // PACK_ROWS]  # [B, K, 16]
            lane = flat % PACK_ROWS
            byte = blocks.gather(2, (lane % 16)[:, None, None].expand(-1, k, 1))[..., 0]
            q = torch.where((lane < 16)[:, None], byte & 0xF, byte >> 4).float()
            sz = head.scales[:, flat].float()  # [G, B, 2]
            w = (q.view(-1, k // gs, gs) - 8) * sz[..., 0].t()[..., None] \
                + sz[..., 1].t()[..., None]
        else:
            q = head.qweight[:, flat].transpose(0, 1).float()  # [B, G, gs]
            w = q * head.scales[:, flat].t().float()[..., None]
        return w.reshape(*ids.shape, k).to(self.dtype_ref.dtype)
