"""nn.Linear with an optional prepacked weight for CPU inference (the engine).

On CPU in fp32, MKL's GEMM for a few rows (a decode step: one row per running sequence) is
slow: 8 rows cost as much as 16 and up to 3x one row. MKL's packed GEMM (the weight reordered
once into its kernel's layout, `torch.ops.mkl._mkl_reorder_linear_weight`; the same op
Inductor's CPU weight prepacking uses) runs SmolLM2's layers 1.5-2x faster at 4-16 rows and
~7-25% faster at 32-512 rows when packed for 512 rows (packed for 16 it is slower on big
chunks; measured in one process, alternating). One and two rows keep the plain product (no
gain there). The pack costs memory (about the weights' size again: +453 MiB resident for
SmolLM2-135M), so only the engine asks for it (EngineConfig.cpu_packed_weights).

The pack is a copy: it is used only while the weight tensor is the one it was made from and
unmodified (same storage, same version counter), and never when autograd needs the weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_MIN_ROWS = 3  # from here on the packed GEMM was measured faster
PACK_BATCH_HINT = 512  # the row count MKL lays the pack out for (fast from 3 rows to 2k)


def packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl,
                                                         "_mkl_reorder_linear_weight")


class Linear(nn.Linear):
    """Same parameters, names and results as nn.Linear (state dicts load unchanged)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw) -> None:
        super().__init__(in_features, out_features, bias=bias, **kw)
        self._pack: tuple[torch.Tensor, int, int] | None = None  # (pack, data_ptr, version)
        self.pad_rows_to = 0  # run the packed GEMM on this many rows when given fewer

    def prepack(self, batch_size: int = PACK_BATCH_HINT, pad_rows_to: int = 0) -> bool:
        """Make the packed copy (CPU fp32 only); False when it cannot be made here.
        pad_rows_to: pad small batches to this many rows (the LM head's GEMM is faster on
        16 rows than on 8 or 12; measured, see the module doc)."""
        w = self.weight
        # An inference tensor has no version counter, so an in-place change could not be seen.
        if (w.device.type != "cpu" or w.dtype != torch.float32 or w.is_inference()
                or not packing_available()):
            self._pack = None
            return False
        with torch.no_grad():
            pack = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), batch_size)
        self._pack = (pack, w.data_ptr(), w._version)
        self.pad_rows_to = pad_rows_to
        return True

    def drop_pack(self) -> None:
        self._pack = None

    @property
    def is_packed(self) -> bool:
        return self._pack is not None

    def _usable_pack(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._pack is None or x.dim() != 2 or x.dtype != torch.float32:
            return None
        if x.shape[0] < PACK_MIN_ROWS:
            return None
        pack, ptr, version = self._pack
        w = self.weight
        if w.data_ptr() != ptr or w._version != version:
            self._pack = None  # the weight was replaced or changed in place: the copy is stale
            return None
        if torch.is_grad_enabled() and (w.requires_grad or x.requires_grad):
            return None
        return pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pack = self._usable_pack(x)
        if pack is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.shape[0]
        if rows < self.pad_rows_to:
            x = torch.cat([x, x.new_zeros(self.pad_rows_to - rows, x.shape[1])])
        # The last argument must be the row count actually passed: on any other value the op
        # silently falls back to the plain product.
        out = torch.ops.mkl._mkl_linear(x.contiguous(), pack, self.weight, self.bias, x.shape[0])
        return out[:rows]
