"""Store and admin subcommands (`ingest`, `admin ...`): filled by the store issue."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """No store commands yet."""
