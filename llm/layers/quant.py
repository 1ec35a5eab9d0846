"""Weight-only quantized linears: int8 and int4 with group-wise scales (group 32-128).

Two forms of one weight W [N, K]:

- `QuantizedTensor`: the canonical, lossless form (codes + fp32 scale/offset per group of
  `group_size` inputs). int4: w = scale * q + offset, q in 0..15 (GGUF Q4_1 is exactly this,
  d and m; Q4_0 is offset = -8 d). int8: w = scale * q, q in -128..127 (GGUF Q8_0 exactly).
  Made from floats (`quantize_int4/8`) or from GGUF blocks (llm/gguf_blocks.py).
- `QuantLinear`: what the model runs. Codes in llama.cpp's block order (int4: per 32 inputs
  16 bytes, low nibble = input j, high nibble = input j + 16; int8: 32 bytes), scales and
  offsets fp32 per group: a GGUF's blocks load without loss. Rows are interleaved in groups
  of ROW_GROUP = 4 (codes [N/4, K/32, 4, block bytes], scales [N/4, K/group, 4]) so the CPU
  kernel streams them sequentially (measured 2x faster than side-by-side rows).

Forward on CPU, by row count (a decode step has one row per sequence, a prefill chunk many):
- < DEQUANT_MIN_ROWS: our kernel (llm/kernels/cpu_quant.cpp, and its AVX-512 VNNI form
  cpu_quant_avx512.cpp where the CPU has it): activations rounded to int8 per 32 inputs (as
  llama.cpp does), int8 dot products; it reads 4.5-5 bits per weight, and a decode step is
  memory-bound. `QuantLinear.many` runs several weights of one input (q/k/v, gate/up) in one
  call that rounds the input once;
- otherwise: the same activation rounding in PyTorch, the layer de-quantized into a shared
  fp32 scratch buffer, MKL GEMM (prefill is compute-bound: fp32 GEMM is faster there).
Both compute the same sums up to fp32 rounding order, so a sequence's result does not depend
on how many rows shared its step (batch invariance). Without the compiled kernel the second
path runs for every row count. Inference only: the rounding has no useful gradient.
On CUDA: the Triton dequant-GEMM (llm/kernels/quant_matmul.py) in the activations' dtype,
activations not rounded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm.kernels.cpu_quant import kernel

QUANT_BITS = {"int8": 8, "int4": 4}
DEQUANT_MIN_ROWS = 64  # from here on de-quantize + fp32 GEMM was measured faster
PACK_ROWS = 32  # out_features must be a multiple of this (the Triton kernel's N tiles)
ACT_BLOCK = 32  # activations are rounded to int8 per this many inputs
ROW_GROUP = 4  # rows interleaved per block in QuantLinear's buffers (cpu_quant.cpp's RB)


@dataclass(slots=True)
class QuantizedTensor:
    bits: int
    group_size: int
    q: torch.Tensor  # [N, K] int4: uint8 0..15, int8: int8
    scale: torch.Tensor  # [N, K // group_size] float32
    offset: torch.Tensor | None  # int4: [N, K // group_size] float32; int8: None (symmetric)

    def __post_init__(self) -> None:
        n, k = self.q.shape
        assert self.bits in (4, 8) and k % self.group_size == 0, (self.bits, k, self.group_size)
        assert self.scale.shape == (n, k // self.group_size)
        assert (self.offset is None) == (self.bits == 8)

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        w = self.q.float().view(n, -1, self.group_size) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.view(n, k)

    def permute_rows(self, index: torch.Tensor) -> "QuantizedTensor":
        """Rows reordered (blocks run along K, so a row permutation is lossless)."""
        return QuantizedTensor(self.bits, self.group_size, self.q[index], self.scale[index],
                               None if self.offset is None else self.offset[index])


def quantize_int4(w: torch.Tensor, group_size: int) -> QuantizedTensor:
    """Asymmetric per group: the group's min and max map to codes 0 and 15."""
    n, k = w.shape
    g = w.detach().float().view(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return QuantizedTensor(4, group_size, q.view(n, k), scale, lo)


def quantize_int8(w: torch.Tensor, group_size: int) -> QuantizedTensor:
    """Symmetric per group: the group's largest magnitude maps to code 127."""
    n, k = w.shape
    g = w.detach().float().view(n, k // group_size, group_size)
    scale = (g.abs().amax(-1) / 127).clamp(min=1e-10)
    q = (g / scale[..., None]).round().clamp(-128, 127).to(torch.int8)
    return QuantizedTensor(8, group_size, q.view(n, k), scale, None)


def quantizable(in_features: int, out_features: int, group_size: int) -> bool:
    return (in_features % group_size == 0 and group_size % ACT_BLOCK == 0
            and out_features % PACK_ROWS == 0)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 -> [N, K/2] bytes: per 32 inputs, input j in the low nibble of
    byte j and input j + 16 in its high nibble (llama.cpp's Q4 block order)."""
    n, k = q.shape
    b = q.to(torch.uint8).view(n, k // 32, 32)
    return (b[..., :16] | (b[..., 16:] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n = packed.shape[0]
    b = packed.view(n, -1, 16)
    return torch.cat([b & 0xF, b >> 4], dim=-1).view(n, -1)


def interleave(t: torch.Tensor, width: int) -> torch.Tensor:
    """[N, C * width] -> [N / 4, C * 4 * width]: chunk c of rows 4i..4i+3 side by side."""
    n = t.shape[0]
    return (t.reshape(n // ROW_GROUP, ROW_GROUP, -1, width).transpose(1, 2)
            .reshape(n // ROW_GROUP, -1))


def deinterleave(t: torch.Tensor, width: int) -> torch.Tensor:
    g = t.shape[0]
    return (t.reshape(g, -1, ROW_GROUP, width).transpose(1, 2)
            .reshape(g * ROW_GROUP, -1))


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 rounded to int8 codes per 32 inputs (scale max|x| / 127), returned as
    their fp32 values: exactly what the CPU kernel multiplies."""
    m, k = x.shape
    xb = x.view(m, k // ACT_BLOCK, ACT_BLOCK)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).view(m, k)


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
        groups, rows = in_features // group_size, out_features // ROW_GROUP
        row_bytes = in_features // 2 if bits == 4 else in_features
        self.register_buffer("qweight", torch.empty(
            rows, ROW_GROUP * row_bytes, dtype=torch.uint8 if bits == 4 else torch.int8,
            device=device))
        self.register_buffer("scales", torch.empty(rows, ROW_GROUP * groups, device=device))
        self.register_buffer("offsets", torch.empty(rows, ROW_GROUP * groups, device=device)
                             if bits == 4 else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not round the fp32 scales (they hold GGUF's fp16 d/m exactly).
        dtypes = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
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
        assert qt.q.shape == (self.out_features, self.in_features) and qt.bits == self.bits
        assert qt.group_size == self.group_size
        block = 16 if self.bits == 4 else 32
        self.qweight.copy_(interleave(pack_int4(qt.q) if self.bits == 4 else qt.q, block))
        self.scales.copy_(interleave(qt.scale, 1))
        if self.bits == 4:
            self.offsets.copy_(interleave(qt.offset, 1))
        if bias is not None:
            self.bias.copy_(bias)

    def codes(self) -> torch.Tensor:
        """[N, K] codes in row order."""
        if self.bits == 4:
            return unpack_int4(deinterleave(self.qweight, 16))
        return deinterleave(self.qweight, 32)

    def quantized(self) -> QuantizedTensor:
        """Back to the canonical form (lossless)."""
        offset = None if self.offsets is None else deinterleave(self.offsets, 1)
        return QuantizedTensor(self.bits, self.group_size, self.codes(),
                               deinterleave(self.scales, 1), offset)

    @torch.no_grad()
    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """W [N, K] in fp32 (into `out` when given)."""
        n, k, gs = self.out_features, self.in_features, self.group_size
        out = torch.empty(n, k, device=self.qweight.device) if out is None else out
        if self.qweight.device.type == "cpu":
            from llm.kernels.cpu_quant import kernel

            mod = kernel()
            if mod is not None:  # ~10x faster than the tensor ops below
                mod.dequantize(out, self.qweight, self.scales, self.offsets, gs, self.bits)
                return out
        w = out.view(n, k // gs, gs)
        w.copy_(self.codes().view_as(w))
        w.mul_(deinterleave(self.scales, 1)[..., None])
        if self.bits == 4:
            w.add_(deinterleave(self.offsets, 1)[..., None])
        return out

    @staticmethod
    def fast_rows(x: torch.Tensor, *linears: nn.Module):
        """The CPU module when x is a decode step's rows (fp32, contiguous, few) and every
        linear is a bias-free QuantLinear, else None."""
        if (x.dim() != 2 or x.dtype != torch.float32 or x.shape[0] >= DEQUANT_MIN_ROWS
                or x.is_cuda or not x.is_contiguous()):
            return None
        if not all(isinstance(m, QuantLinear) and m.bias is None for m in linears):
            return None
        return kernel()

    @staticmethod
    def many(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
        """[m(x) for m in linears]; for decode rows on CPU one kernel call that rounds x once
        (q/k/v, gate/up)."""
        mod = QuantLinear.fast_rows(x, *linears)
        if mod is None:
            return [m(x) for m in linears]
        return mod.quant_mm_many(x, [m.qweight for m in linears], [m.scales for m in linears],
                                 [m.offsets for m in linears], [m.group_size for m in linears])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            # A decode step's shape (fp32 rows on CPU): straight to the kernel. At batch 1
            # the general path's reshapes and casts cost ~a third of the GEMV itself.
            mod = QuantLinear.fast_rows(x, self)
            if mod is not None:
                return self._kernel_mm(mod, x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda:
            from llm.kernels.quant_matmul import quant_matmul_triton
            out = quant_matmul_triton(x2, self.qweight, self.scales, self.offsets, self.bits,
                                      self.group_size)
        else:
            out = self._cpu(x2.float().contiguous()).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*lead, self.out_features)

    def _cpu(self, x: torch.Tensor) -> torch.Tensor:
        mod = kernel()
        if mod is not None and x.shape[0] < DEQUANT_MIN_ROWS:
            return self._kernel_mm(mod, x)
        w = self.dequantize(_scratch_weight(self.out_features, self.in_features, x.device))
        xr = mod.round_activations(x) if mod is not None else round_activations(x)
        return F.linear(xr, w)

    def _kernel_mm(self, mod, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] fp32 contiguous through the CPU kernel (int8 activation blocks)."""
        if self.bits == 4:
            return mod.q4_mm(x, self.qweight, self.scales, self.offsets, self.group_size)
        return mod.q8_mm(x, self.qweight, self.scales, self.group_size)

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
        flat = ids.reshape(-1)
        group, lane = flat // ROW_GROUP, flat % ROW_GROUP
        block = 16 if head.bits == 4 else 32
        codes = head.qweight.view(head.qweight.shape[0], -1, ROW_GROUP, block)[group, :, lane]
        codes = codes.reshape(flat.shape[0], -1)
        q = (unpack_int4(codes) if head.bits == 4 else codes).float()
        sc = head.scales.view(head.scales.shape[0], -1, ROW_GROUP)[group, :, lane]
        w = q.view(flat.shape[0], -1, head.group_size) * sc[..., None]
        if head.bits == 4:
            off = head.offsets.view(head.offsets.shape[0], -1, ROW_GROUP)[group, :, lane]
            w = w + off[..., None]
        return w.reshape(*ids.shape, head.in_features).to(self.dtype_ref.dtype)
