"""Training windows kept on the training device.

Every window is left-padded to max_len once, at the start of training, and a step gathers its
batch with one index on the device. Before, each step padded numpy arrays and copied them to the
device: a host-to-device copy and a wait per step on a GPU, and Python work per step on a CPU.

A batch is its rows' last `width` columns, `width` its longest window: with left padding that is
exactly what left_pad_tensors gives for those windows. A crop (training/split.crop_starts) turns
a window's first events into padding, which is again exactly the cropped window left-padded.
Window lengths stay on the host, so a batch's width and its target count need no device sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from userenc.spec import PAD_ID, FeatureSpec
from userenc.tokenize import left_pad


@dataclass(slots=True)
class DeviceWindows:
    ids: dict[str, torch.Tensor]  # [N, max_len(, V)] per feature (and the times), left-padded
    valid: torch.Tensor  # [N, max_len] bool: a real event
    lengths: np.ndarray  # [N] events per window (host copy)

    @classmethod
    def build(cls, items: list[dict[str, np.ndarray]], spec: FeatureSpec, max_len: int,
              device: torch.device) -> "DeviceWindows":
        assert items, "no training windows"
        ids, valid = left_pad(items, spec, max_len)
        return cls({k: torch.from_numpy(v).to(device) for k, v in ids.items()},
                   torch.from_numpy(valid).to(device), valid.sum(axis=1).astype(np.int64))

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray, lengths: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(ids, valid) of these windows, each cut to its last `lengths[i]` events (this epoch's
        crop: `lengths - crop_starts`; the windows' own lengths for none)."""
        assert len(rows) == len(lengths) and lengths.min() >= 1, "a batch of non-empty windows"
        assert (lengths <= self.lengths[rows]).all(), "a crop only shortens a window"
        width = int(lengths.max())
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.valid.device)
        ids = {k: v[index, -width:] for k, v in self.ids.items()}
        valid = self.valid[index, -width:]
        if (lengths < self.lengths[rows]).any():
            keep = torch.from_numpy(np.arange(width)[None, :] >= width - lengths[:, None]).to(valid.device)
            valid = valid & keep
            ids = {k: torch.where(keep.view(keep.shape + (1,) * (v.dim() - 2)), v, PAD_ID) for k, v in ids.items()}
        return ids, valid
