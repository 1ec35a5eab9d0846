"""`userllm serve`: filled by the API issue."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """No serve command yet."""
