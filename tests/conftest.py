"""Test-wide set-up. Triton kernels run under the interpreter on CPU: the variable must be set
before any kernel module is imported, so it is set here, first, unless the caller chose:
`make test-gpu` sets TRITON_INTERPRET=0 to run the compiled kernels on CUDA."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Two cores, two xdist workers: one thread each keeps them from fighting.
torch.set_num_threads(1)
