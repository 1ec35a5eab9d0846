"""Run by the DDP test (under torchrun, or alone as the one-process reference): trains a tiny
encoder through `train_encoder`, then every rank writes its own final weights beside the run
so the test can compare the ranks with each other and with one process.

    python ddp_driver.py DATA OUT BATCH_SIZE
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_model

from training import distributed as dist
from training.config import TrainConfig
from training.data import load_dataset
from training.train_encoder import train_encoder
from userenc.config import EncoderConfig


def main(data: str, out: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    dist.init()
    ds = load_dataset(data, "jsonl", "movielens")
    # No dropout and the full softmax: nothing random differs between one process and two.
    cfg = EncoderConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=16, out_dim=8,
                        item_loss="full")
    result = train_encoder(ds.histories, ds.spec, cfg,
                           TrainConfig(epochs=2, batch_size=batch_size, lr=5e-3, seed=3),
                           Path(out), progress=False)
    save_model(result.model, str(Path(out).parent / f"{Path(out).name}.rank{dist.rank()}.safetensors"))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
